"""FLOP counting with torch's FlopCounterMode, including attention on the CPU.

torch counts the CUDA attention kernels but not `_scaled_dot_product_flash_attention_for_cpu`
(what SDPA dispatches to on the CPU), so a CPU count would silently leave out every
attention. The CPU kernel gets the same formula as the CUDA ones: 2*B*H*Lq*S*(d_qk + d_v).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_cpu_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, num_queries, head_dim = query_shape
    num_keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * num_queries * num_keys * (head_dim + value_dim)


def flop_counter(display: bool = False, depth: int = 3) -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=display, depth=depth, custom_mapping={_CPU_SDPA: _sdpa_cpu_formula})
