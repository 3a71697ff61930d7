"""The errors mnet raises at its public boundary.

Every error is a subclass of :class:`MnetError` (and of ``ValueError`` where the cause is a bad value), so a
caller can catch all of mnet's complaints at once while the command line turns each into one line.
"""

from __future__ import annotations


class MnetError(Exception):
    """Base class of every error mnet raises on purpose."""


class SettingError(MnetError, ValueError):
    """An argument outside what a function accepts: a negative norm, a batch size of zero, an unknown name, a
    missing key for a function that samples. The message names the function and the argument."""


class KindError(MnetError, TypeError):
    """An argument of the wrong kind: a class where an instance is expected, an object that is not a layer."""


class LayerError(MnetError, ValueError):
    """A layer received an input or parameters it cannot use.

    The message names the layer, its position in the network (``[2]`` is the third layer of a ``serial``,
    ``[1][0]`` the first layer inside the second) and the shapes involved. Combinators prepend their
    index to ``path`` as the error travels outwards, so the position is exact however deep the layer sits.

    Attributes:
        layer: ``repr`` of the layer that complained (a string is taken as already rendered).
        detail: what was wrong, with the expected and the received shapes.
        path: indices from the outermost combinator down to the layer.
    """

    def __init__(self, layer: object, detail: str, path: tuple[int, ...] = ()):
        self.layer = layer if isinstance(layer, str) else repr(layer)
        self.detail = detail
        self.path = tuple(path)
        super().__init__(self.layer, detail, self.path)

    def __str__(self) -> str:
        where = f" at position {''.join(f'[{i}]' for i in self.path)} of the network" if self.path else ""
        return f"{self.layer}{where}: {self.detail}"


class LossError(MnetError, ValueError):
    """Outputs and targets that a loss cannot compare (shapes, dtypes, label ranges)."""


class DataError(MnetError, ValueError):
    """A dataset file that is missing, malformed or inconsistent."""


class CheckpointError(MnetError, ValueError):
    """A parameter or training checkpoint file that is missing, truncated, corrupted or mismatched."""


class DivergenceError(MnetError):
    """Training produced a loss that is NaN or infinite."""


class SearchEdgeWarning(UserWarning):
    """A search (a grid, a bracketed bisection) found its best value at the edge of where it looked: the optimum may
    lie beyond, and the value returned is the edge, not an optimum."""
