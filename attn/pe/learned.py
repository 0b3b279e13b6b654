"""Learned absolute positional embeddings: a trained table of `max_len` rows added to x.

Gehring et al. 2017, "Convolutional Sequence to Sequence Learning" (arXiv 1705.03122) and
Devlin et al. 2019 (BERT); Vaswani et al. 2017 report them on par with sinusoids. A
position past the table has no embedding: `validate` rejects an evaluation position past
the table unless `extension="clip"` (reuse the last row). Inside jit nothing can raise, so
the lookup always clips; `validate` is the gate. Float positions (interpolated sampler)
interpolate linearly between neighbouring rows.
"""

import jax
from flax import nnx

from attn.pe.base import PositionalEncoding, lookup_rows, param
from attn.registry import ConfigError, merge_defaults, require

EXTENSIONS = ("error", "clip")


class Learned(PositionalEncoding):
    """x + table[pos], table of shape (max_len, d_model), init normal(init_std)."""

    DEFAULTS = {"max_len": 2048, "extension": "error", "init_std": 0.02}

    @classmethod
    def validate(cls, cfg, *, max_eval_position, num_heads, head_dim):
        c = merge_defaults(cls.DEFAULTS, cfg, "model.pe")
        require(
            c["extension"] in EXTENSIONS,
            "pe.extension",
            f"unknown policy {c['extension']!r}; allowed: {', '.join(EXTENSIONS)}",
        )
        if c["extension"] == "error" and max_eval_position >= c["max_len"]:
            raise ConfigError(
                f"pe.max_len: position {max_eval_position} is past the learned table of "
                f"{c['max_len']} rows; raise max_len or set pe.extension='clip'"
            )

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        init = jax.nn.initializers.normal(self.cfg["init_std"])
        self.table = param(rngs, init, (self.cfg["max_len"], d_model), (None, "embed"))

    def embed(self, x_BLD, pos_BL):
        table: nnx.Param = self.table
        return x_BLD + lookup_rows(table[...], pos_BL).astype(x_BLD.dtype)
