"""Pallas kernels: flash attention with the positional bias computed in-kernel.

`flash_attention` (attn.kernels.flash) is `impl="flash"` of attn.attention; `KernelBias`
(attn.kernels.bias) is what a positional encoding's `kernel_bias` hook returns;
attn.kernels.benchmark times flash against the other implementations on one device.
"""

from attn.kernels.bias import (
    KINDS,
    KernelBias,
    PositionalBias,
    alibi,
    bucketed_table,
    kerple,
    positional_bias,
    table,
)
from attn.kernels.flash import DEFAULT_BLOCKS, PLATFORMS, flash_attention

__all__ = [
    "DEFAULT_BLOCKS",
    "KINDS",
    "PLATFORMS",
    "KernelBias",
    "PositionalBias",
    "alibi",
    "bucketed_table",
    "flash_attention",
    "kerple",
    "positional_bias",
    "table",
]
