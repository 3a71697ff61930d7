"""Models and weights from other frameworks and formats: Equinox, Flax NNX and PyTorch models become mnet networks
with their weights (:func:`from_equinox`, :func:`from_flax`, :func:`from_torch`), and LLaMA-style checkpoints with Hugging Face's tensor names
become :func:`mnet.models.gpt` (:func:`load_llama`; :func:`export_llama` and :func:`save_llama` back).

After conversion the network is an ordinary mnet network: gradients, per-example norms, curvature, K-FAC and
Laplace work on it unchanged. The frameworks are optional (``pip install mnet[bridges]``); each bridge imports its
own only when called.
"""

from mnet.interop.build import UnsupportedLayer
from mnet.interop.equinox_bridge import from_equinox
from mnet.interop.flax_bridge import from_flax
from mnet.interop.llama import export_llama, load_llama, save_llama
from mnet.interop.torch_bridge import from_torch

__all__ = ["UnsupportedLayer", "export_llama", "from_equinox", "from_flax", "from_torch", "load_llama", "save_llama"]
