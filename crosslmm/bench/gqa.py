"""Why GatedCrossAttention folds query-head groups into the query axis: three ways to run
grouped-query cross-attention through SDPA, timed on the same tensors."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def time_layouts(queries: int = 128, frames: int = 64, original_tokens_per_frame: int = 729, heads: int = 12,
                 kv_heads: int = 2, head_dim: int = 128, repeats: int = 3) -> dict[str, float]:
    """Median milliseconds of each layout; all three compute the same result (asserted)."""
    generator = torch.Generator().manual_seed(0)
    keys = frames * original_tokens_per_frame
    rep = heads // kv_heads
    q = torch.randn(1, heads, queries, head_dim, generator=generator)
    k = torch.randn(1, kv_heads, keys, head_dim, generator=generator)
    v = torch.randn(1, kv_heads, keys, head_dim, generator=generator)
    layouts = {
        "repeat K/V": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)),
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "fold groups into queries": lambda: F.scaled_dot_product_attention(
            q.reshape(1, kv_heads, rep * queries, head_dim), k, v
        ).reshape(1, heads, queries, head_dim),
    }
    reference = layouts["repeat K/V"]()
    result = {}
    for name, fn in layouts.items():
        torch.testing.assert_close(fn(), reference, atol=1e-4, rtol=1e-4)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        result[name] = statistics.median(times)
    return result
