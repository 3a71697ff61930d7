"""Multi-head self-attention: three dense projections, the attention core (whole or blockwise), and an output
projection."""

from mnet.layers.attention.blockwise import BlockwiseAttentionCore
from mnet.layers.attention.core import AttentionCore
from mnet.layers.attention.heads import HeadLayout
from mnet.layers.attention.multi_head import MultiHeadSelfAttention

__all__ = ["AttentionCore", "BlockwiseAttentionCore", "HeadLayout", "MultiHeadSelfAttention"]
