"""Tied weights: a language model whose read-out reuses its token embedding (Press and Wolf 2017).

``Tied(embedding, body)`` computes ``logits = body(E[ids]) E^T`` with one table ``E`` ``(vocab, d)``: the network
``serial(embedding, body, Unembed(vocab))`` whose first and last units share ``E``. Every quantity walks through
that network; at the end the tied table's two shares meet in the quantity's own :meth:`mnet.core.Quantity.tie`:

* linear in the gradient (the gradient, per-example gradients, Hessian- and GGN-vector products, forward mode,
  Jacobians): the two uses' shares add, exactly, ``dE = dE_lookup + dE_readout``;
* quadratic in it (per-example norms, the NTK, the GGN diagonal): the cross terms between the uses are not in the
  shares, so these fall back to one example at a time (each example's summed gradient of ``E``, squared), exact;
* the Hessian diagonal: the two uses' diagonals plus twice the diagonal of their mixed block, which the quantity
  computes from the layer's caches in :meth:`mnet.core.Quantity.tie_at`
  (:func:`mnet.quantities.diag_hessian.tied_cross_diagonal`: ``T d`` tangent passes through the body);
* Kronecker factors: none for ``E``. Its GGN block is ``B_lookup + B_readout + cross terms``; the lookup's block is
  ``kron(onehot counts, G)`` over ``(vocab, d)`` and the read-out's, for ``W = E^T``, ``kron(h h^T, g g^T)`` with the
  roles of rows and columns exchanged, and no single Kronecker product holds the sum. K-FAC keeps ``E``'s plain
  gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from mnet.core.layer import describe, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, call_forward, init_layer, takes_mask
from mnet.core.walk import Compound, Quantity, walk
from mnet.errors import KindError, LayerError
from mnet.layers.combinators import Serial
from mnet.layers.dense import Dense
from mnet.layers.embedding import Embedding


@dataclass(frozen=True, repr=False)
class Unembed(Compound):
    """The read-out ``z = h E^T`` of a table ``E`` ``(vocab, d)``: a bias-free :class:`mnet.Dense` whose weight is
    ``E^T``, every rule that dense layer's with the shares transposed back. Params ``{"W": E}``."""

    vocab: int

    def __post_init__(self):
        positive_int(self.vocab, "vocab", "Unembed")

    def __repr__(self) -> str:
        return f"Unembed({self.vocab})"

    def network(self, cache: Cache) -> Dense:
        return Dense(self.vocab, use_bias=False)

    def to_network(self, params: Params) -> Params:
        return {"W": params["W"].T}

    def from_network(self, tree: Any) -> Any:
        """A share shaped like the dense weight (a gradient, per-example gradients, a diagonal) transposed back to
        ``E``'s layout; any other (a norm, Kronecker factors) as it is."""
        if isinstance(tree, dict) and set(tree) == {"W"} and hasattr(tree["W"], "ndim"):
            return {"W": jnp.swapaxes(tree["W"], -1, -2)}
        return tree

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape, params = Dense(self.vocab, use_bias=False).init(key, self._check_input_shape(input_shape), dtype)
        return shape, {"W": params["W"].T}

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        if not isinstance(params, dict) or set(params) != {"W"} or params["W"].shape[0] != self.vocab:
            raise self._fail(f"expects params {{'W': ({self.vocab}, d)}}, got {describe(params)}")
        return Dense(self.vocab, use_bias=False).forward(self.to_network(params), x)


@dataclass(frozen=True, repr=False)
class Tied(Compound):
    """``logits = body(E[ids]) E^T``: a token embedding, any body, and a read-out that reuses the embedding's table
    (see :mod:`mnet.layers.tied`). Params ``{"embedding": {"W": E}, "body": body's params}``.

    Arguments:
        embedding: the :class:`mnet.Embedding` whose table is shared.
        body: the network between the lookup and the read-out, ``(..., d) -> (..., d)``.
    """

    embedding: Embedding
    body: Any

    def __post_init__(self):
        if not isinstance(self.embedding, Embedding):
            raise KindError(f"Tied: embedding must be an mnet.Embedding, got {self.embedding!r}")

    def __repr__(self) -> str:
        return f"Tied({self.embedding!r}, {self.body!r})"

    @property
    def takes_mask(self) -> bool:
        return takes_mask(self.body)

    @property
    def input_vocab(self) -> int:
        return self.embedding.vocab

    def network(self, cache: Cache) -> Serial:
        return Serial((self.embedding, self.body, Unembed(self.embedding.vocab)))

    def to_network(self, params: Params) -> Params:
        return (params["embedding"], params["body"], params["embedding"])

    def from_network(self, tree: Any) -> Any:
        raise NotImplementedError("Tied combines its table's two shares in walk, by the quantity's own rule")

    def walk(self, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        inner = self.network(caches[0])
        (lookup, body, readout), below = walk(inner, quantity, self.to_network(params), caches, carried)
        return {"embedding": quantity.tie_at(self, params, caches, carried, lookup, readout), "body": body}, below

    def uses(self, cache: Cache) -> tuple[Array, Cache, Array]:
        """What a forward pass left of the table's two uses: ``(ids, the body's cache, h)``, ``h`` the body's
        output that the read-out multiplies by ``E^T``."""
        ids, body_cache, readout_cache = cache
        return ids, body_cache, readout_cache

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        try:
            shape, (embedding, body, _) = init_layer(self.network(None), key, input_shape, dtype)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        if tuple(shape[-1:]) != (self.embedding.vocab,):
            raise self._fail(f"expects the body to keep the embedding width, got output shape {tuple(shape)}")
        return tuple(shape), {"embedding": embedding, "body": body}

    def forward(self, params: Params, x: Array, mask: Array | None = None) -> tuple[Array, Cache]:
        if not isinstance(params, dict) or set(params) != {"embedding", "body"}:
            raise self._fail(f"expects params with keys ['body', 'embedding'], got {describe(params)}")
        try:
            return call_forward(self.network(None), self.to_network(params), x, mask=mask)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
