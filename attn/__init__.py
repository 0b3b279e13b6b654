"""attn: attention and positional-encoding variants for length-generalization research.

Shape letters used in names and einsum strings throughout the library (README "Interfaces"):
B batch, L query length, S key length, H query heads, G key/value heads (H % G == 0),
K head dim, D model dim, F MLP dim, V vocab.
"""
