"""Recurrent layers (RNN, LSTM, GRU) with backpropagation through time written out (:mod:`.through_time`, the
cells in :mod:`.cells`), and ``LastStep``."""

from mnet.layers.recurrent.cells import GRU, LSTM, RNN
from mnet.layers.recurrent.last_step import LastStep
from mnet.layers.recurrent.through_time import Recurrent

__all__ = ["GRU", "LSTM", "RNN", "LastStep", "Recurrent"]
