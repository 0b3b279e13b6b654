"""Positional encodings: one file per encoding, registered here by name.

Each entry is a `attn.pe.base.PositionalEncoding` subclass (see base.py for the hooks and
class attributes). Adding an encoding is one file plus one line below; the contract tests
in tests/test_pe.py enumerate this dict and cover it.
"""

from collections.abc import Mapping
from typing import Any

from flax import nnx

from attn.pe.alibi import ALiBi
from attn.pe.base import PositionalEncoding
from attn.pe.cope import CoPE
from attn.pe.dape import DAPE
from attn.pe.fire import Fire
from attn.pe.fox import FoX
from attn.pe.kerple import Kerple
from attn.pe.learned import Learned
from attn.pe.none import NoPE
from attn.pe.pope import PoPE
from attn.pe.prope import PRoPE
from attn.pe.rope import RoPE
from attn.pe.shaw import Shaw
from attn.pe.sinusoidal import Sinusoidal
from attn.pe.t5 import T5Bias
from attn.pe.xpos import XPos
from attn.registry import lookup

REGISTRY: dict[str, type[PositionalEncoding]] = {
    "none": NoPE,
    "sinusoidal": Sinusoidal,
    "learned": Learned,
    "rope": RoPE,
    "alibi": ALiBi,
    "t5": T5Bias,
    "xpos": XPos,
    "kerple": Kerple,
    "fire": Fire,
    "shaw": Shaw,
    "cope": CoPE,
    "p_rope": PRoPE,
    "pope": PoPE,
    "fox": FoX,
    "dape": DAPE,
}


def get(name: str) -> type[PositionalEncoding]:
    """The class registered as `name` (ConfigError listing the valid names otherwise)."""
    return lookup(REGISTRY, name, "pe.name")


def default_config(name: str) -> dict:
    """The full config block of encoding `name`: {"name": name, **DEFAULTS}."""
    return {"name": name, **get(name).DEFAULTS}


def build(
    cfg: Mapping[str, Any],
    *,
    d_model: int,
    num_heads: int,
    head_dim: int,
    causal: bool,
    rngs: nnx.Rngs,
) -> PositionalEncoding:
    """Build the encoding named cfg["name"] from its config block."""
    return get(cfg["name"])(
        cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
    )
