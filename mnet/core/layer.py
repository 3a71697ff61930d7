"""``Layer``, the convenience base class, and the checks every layer makes at its boundary.

Subclassing :class:`Layer` is never required (:mod:`mnet.core.protocol`): it supplies ``apply``, the flags the walks
read (``stochastic``, ``curvature_free``) and helpers that raise :class:`mnet.errors.LayerError` naming the layer and
the shapes; combinators add the position (:func:`located`). The optional rules of the quantities are not methods of
the base class: a layer defines the rules its structure makes cheaper, and every walk finds them by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, Cache, Params, Shape
from mnet.errors import LayerError, SettingError


class Layer:
    """A convenience base class: ``apply``, the flags the walks read, and boundary checks.

    Subclasses are frozen dataclasses (immutable and hashable, so they can be static arguments of ``jax.jit``) and
    define ``init``, ``forward`` and ``backward``. The optional rules (``per_example_backward``,
    ``per_example_sq_norms``, ``ntk_contribution``, ...) are not methods of this class: a layer defines one only
    where its structure makes the quantity cheaper, and each quantity's walk (:mod:`mnet.core.walk`) uses the
    layer's own method when there is one and the rule's default otherwise.

    A layer with randomness (dropout) sets ``stochastic = True`` and takes
    ``forward(params, x, *, key=None, train=False)``; combinators pass a key and the train flag only to
    stochastic children.

    A layer whose output is linear (or piecewise linear) in its input and parameters jointly, with no products of
    the two (a rearrangement, a pool, a mask, a lookup), sets ``curvature_free = True``; the Hessian diagonal and
    Hessian-vector products then pass through its ``backward`` alone."""

    curvature_free = False

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        raise NotImplementedError

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        raise NotImplementedError

    def apply(self, params: Params, x: Array, **kwargs) -> Array:
        """The output alone: ``forward(params, x)[0]``."""
        return self.forward(params, x, **kwargs)[0]

    # Helpers for the checks every layer makes at its boundary.
    def _fail(self, detail: str) -> LayerError:
        return LayerError(self, detail)

    def _check_input(self, x: Array, min_rank: int = 2) -> None:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise self._fail(f"expects an array input, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise self._fail(f"expects a floating-point input, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.ndim < min_rank:
            raise self._fail(
                f"expects input of rank >= {min_rank} (batch, ...), got shape {tuple(x.shape)}; "
                "add a leading batch axis (x[None]) for a single example"
            )

    def _check_input_shape(self, input_shape: Shape, min_rank: int = 1) -> Shape:
        try:
            shape = tuple(int(d) for d in input_shape)
        except TypeError:
            raise self._fail(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
        if len(shape) < min_rank or any(d <= 0 for d in shape):
            raise self._fail(
                f"expects an example shape of rank >= {min_rank} with positive sizes (no batch axis), got {shape}"
            )
        return shape

    def _check_no_params(self, params: Params) -> None:
        if params != ():
            raise self._fail(f"has no parameters and expects (), got {describe(params)}")


def shape_record(x: Array) -> Array:
    """A zero-size array of shape ``(0, *example_shape)``: it records ``x``'s example shape in a cache as data that
    crosses ``jit`` and ``custom_vjp`` boundaries, at no memory cost."""
    return jnp.zeros((0,) + x.shape[1:], x.dtype)


def positive_int(value: Any, name: str, owner: str) -> None:
    """Refuse a size that is not a positive ``int`` (``bool`` is not a size) with a ``ValueError`` naming the layer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SettingError(f"{owner}: {name} must be a positive int, got {value!r}")


def describe(tree: Any) -> str:
    """A short structural description of a pytree: arrays as their shapes, cut at 240 characters."""
    text = str(jax.tree_util.tree_map(lambda leaf: tuple(getattr(leaf, "shape", ())) or type(leaf).__name__, tree))
    return text if len(text) <= 240 else text[:237] + "..."


def located(index: int, error: LayerError) -> LayerError:
    """The same error, one level further out: its position gains ``index`` at the front."""
    return LayerError(error.layer, error.detail, (index,) + error.path)


def check_param_keys(layer: Layer, params: Params, expected: set[str]) -> None:
    """Params must be a dict with exactly the ``expected`` keys."""
    if not isinstance(params, dict) or set(params) != expected:
        raise layer._fail(f"expects params with keys {sorted(expected)}, got {describe(params)}")
