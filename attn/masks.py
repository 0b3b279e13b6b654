"""Attention masks as pure functions: causal, local window, padding, segment, and their AND.

All masks are boolean with True where a query may attend to a key, broadcastable to BHLS
(the convention of `jax.nn.dot_product_attention`). Causal and window masks are aligned
bottom-right (README "Interfaces"): with L queries and S keys, query i sits at position
`S - L + i` among the keys, which is what a KV cache needs (the last query is the newest
token). `jax.nn.dot_product_attention` aligns them top-left instead, so it is not used here.

The causal and window masks take optional row/column index arrays so that blockwise
attention (the chunked implementation, after Rabe & Staats 2021, "Self-attention Does Not
Need O(n^2) Memory", and Dao et al. 2022, FlashAttention) can build one block's mask at a
time without an L x S matrix. Sliding windows follow Beltagy et al. 2020 (Longformer) and
Child et al. 2019 (sparse transformers); with `causal` the window bounds only the past, so
`window=1` lets a token see itself only.
"""

import jax.numpy as jnp

from attn.registry import ConfigError


def _indices(length: int, idx):
    return jnp.arange(length, dtype=jnp.int32) if idx is None else jnp.asarray(idx, jnp.int32)


def relative_positions(L: int, S: int, q_idx=None, k_idx=None):
    """(query position - key position) for rows q_idx (default all L) and columns k_idx.

    Query row i is at key position S - L + i (bottom-right alignment). Returns int32 of
    shape (len(q_idx), len(k_idx)).
    """
    q_pos = _indices(L, q_idx) + (S - L)
    return q_pos[:, None] - _indices(S, k_idx)[None, :]


def causal_mask(L: int, S: int, q_idx=None, k_idx=None):
    """LS bool: key j is visible from query i iff j <= S - L + i."""
    return relative_positions(L, S, q_idx, k_idx) >= 0


def check_window(window) -> None:
    """Raise ConfigError unless window is None or a positive int."""
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ConfigError(f"model.window: must be a positive integer or None, got {window!r}")


def window_mask(L: int, S: int, window: int | None, causal: bool, q_idx=None, k_idx=None):
    """LS bool: |pos_i - j| < window; with causal also j <= pos_i (the window bounds the past).

    window=None means no window: the plain causal mask if causal, else all True.
    """
    check_window(window)
    rel = relative_positions(L, S, q_idx, k_idx)
    allowed = rel >= 0 if causal else jnp.ones(rel.shape, bool)
    if window is not None:
        allowed = allowed & (jnp.abs(rel) < window)
    return allowed


def padding_mask(q_valid_BL=None, k_valid_BS=None):
    """B1LS bool from per-token validity (True = real token); either side may be None (all valid).

    Returns None when both are None.
    """
    if q_valid_BL is None and k_valid_BS is None:
        return None
    if q_valid_BL is None:
        return jnp.asarray(k_valid_BS, bool)[:, None, None, :]
    if k_valid_BS is None:
        return jnp.asarray(q_valid_BL, bool)[:, None, :, None]
    return (
        jnp.asarray(q_valid_BL, bool)[:, None, :, None]
        & jnp.asarray(k_valid_BS, bool)[:, None, None, :]
    )


def segment_mask(q_seg_BL, k_seg_BS):
    """B1LS bool: a query attends only to keys of the same segment id (packed sequences)."""
    return jnp.asarray(q_seg_BL)[:, None, :, None] == jnp.asarray(k_seg_BS)[:, None, None, :]


def combine(*masks):
    """Logical AND of masks with broadcasting; None entries are ignored; all None gives None."""
    present = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out
