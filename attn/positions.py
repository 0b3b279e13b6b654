"""Position samplers: where the positions fed to a positional encoding come from.

A sampler turns (batch size, length) into positions `pos_BL`; the positional encoding
(attn/pe/) decides what a position means. Keeping the two apart makes "randomized RoPE"
a config combination (pe=rope, positions=randomized) rather than a new class.

- "identity": 0..L-1 (int32).
- "randomized": Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
  Generalization of Transformers" (arXiv 2305.16843). During training, an ordered random
  subset of L positions drawn without replacement from [0, max_len) (int32), so that the
  model sees the large positions it will meet at test time. The reference code draws one
  index vector for the whole batch; that is our default (`per_sequence=False`), and
  `per_sequence=True` draws one per sequence. The reference code also samples at test
  time; here evaluation uses identity positions unless `at_eval=True` (random
  positions at evaluation are a config choice, off by default).
- "interpolated": positions multiplied by `factor` (float32), as in position interpolation
  (Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
  Interpolation", arXiv 2306.15595), where factor = train length / eval length < 1 squeezes
  long inputs into the trained range.

Interface (README "Interfaces"): `cls(cfg)`, `sampler(batch_size, length, *, train, rng) -> pos_BL`,
`sampler.max_position(length) -> int`. Padding is on the right, so the positions of real
tokens do not depend on how much padding follows.
"""

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.registry import lookup, merge_defaults, require


class Sampler:
    """Base class: holds the resolved config; subclasses define __call__ and max_position."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = merge_defaults(self.DEFAULTS, cfg, "positions")

    def __call__(
        self,
        batch_size: int,
        length: int,
        *,
        train: bool,
        rng: jax.Array | None = None,
        valid_B: jax.Array | None = None,
    ) -> jax.Array:
        """pos_BL. `valid_B`: real tokens per row (right padding); None means all `length`."""
        raise NotImplementedError

    def max_position(self, length: int) -> int:
        raise NotImplementedError


def _identity(batch_size: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))


class Identity(Sampler):
    """Positions 0..L-1 for every sequence."""

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None):
        del train, rng, valid_B
        return _identity(batch_size, length)

    def max_position(self, length: int) -> int:
        return length - 1


def sorted_subset(rng: jax.Array, length: int, max_len: int, count=None) -> jax.Array:
    """A uniformly random subset of `count` (default `length`) distinct ints from
    [0, max_len), ascending, in the first `count` of `length` slots; the slots after them
    (padding) hold max_len - 1. `count` may be traced.
    """
    # The top-k of iid uniform keys is a uniform random subset without replacement, and so
    # are the `count` largest of them. Drawing `length` positions for a row of `count` real
    # tokens and keeping the smallest `count` would instead crowd them towards 0.
    _, idx = jax.lax.top_k(jax.random.uniform(rng, (max_len,)), length)
    if count is None:
        return jnp.sort(idx).astype(jnp.int32)
    idx = jnp.sort(jnp.where(jnp.arange(length) < count, idx, max_len))
    return jnp.minimum(idx, max_len - 1).astype(jnp.int32)


class Randomized(Sampler):
    """Ruoss et al. 2023: sorted random positions from [0, max_len) while training."""

    DEFAULTS = {"max_len": 2048, "at_eval": False, "per_sequence": False}

    def __init__(self, cfg):
        super().__init__(cfg)
        require(self.cfg["max_len"] >= 1, "positions.max_len", "must be >= 1")

    def _active(self, train: bool) -> bool:
        return train or self.cfg["at_eval"]

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None):
        if not self._active(train):
            return _identity(batch_size, length)
        max_len = self.cfg["max_len"]
        require(
            length <= max_len,
            "positions.max_len",
            f"length {length} is longer than max_len {max_len}; raise max_len",
        )
        if rng is None:
            raise ValueError("randomized positions need an rng (the 'positions' stream)")
        if self.cfg["per_sequence"]:
            keys = jax.random.split(rng, batch_size)
            counts = jnp.full((batch_size,), length) if valid_B is None else valid_B
            return jax.vmap(lambda key, n: sorted_subset(key, length, max_len, n))(keys, counts)
        # One vector per batch (Ruoss et al.'s code): sized for the longest real row.
        count = None if valid_B is None else jnp.max(valid_B)
        return jnp.broadcast_to(sorted_subset(rng, length, max_len, count), (batch_size, length))

    def max_position(self, length: int) -> int:
        """max_len - 1 whenever the sampler can be active for this length, else length - 1."""
        if self.cfg["at_eval"]:
            require(
                length <= self.cfg["max_len"],
                "positions.max_len",
                f"length {length} is longer than max_len {self.cfg['max_len']}; raise max_len",
            )
        return max(self.cfg["max_len"], length) - 1


class Interpolated(Sampler):
    """Chen et al. 2023 position interpolation: float positions i * factor."""

    DEFAULTS = {"factor": 1.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        require(self.cfg["factor"] > 0, "positions.factor", "must be > 0")

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None):
        del train, rng, valid_B
        pos = jnp.arange(length, dtype=jnp.float32) * jnp.float32(self.cfg["factor"])
        return jnp.broadcast_to(pos, (batch_size, length))

    def max_position(self, length: int) -> int:
        return math.ceil((length - 1) * self.cfg["factor"])


REGISTRY: dict[str, type[Sampler]] = {
    "identity": Identity,
    "randomized": Randomized,
    "interpolated": Interpolated,
}


def default_config(name: str) -> dict:
    """The full config block of sampler `name`: {"name": name, **DEFAULTS}."""
    return {"name": name, **lookup(REGISTRY, name, "positions.name").DEFAULTS}


def build(cfg: Mapping[str, Any]) -> Sampler:
    """Build the sampler named cfg["name"] from its config block."""
    return lookup(REGISTRY, cfg["name"], "positions.name")(cfg)
