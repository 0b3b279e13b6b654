"""NoPE: no positional encoding at all.

Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization in
Transformers" (arXiv 2305.19466): a causal decoder without any positional encoding can
still infer positions (through the causal mask) and generalises best in their study. In a
bidirectional encoder NoPE is permutation-equivariant, so it cannot tell positions apart.
"""

from attn.pe.base import PositionalEncoding


class NoPE(PositionalEncoding):
    """All hooks are the identity; the attention logits ignore positions."""

    shift_invariant = True
