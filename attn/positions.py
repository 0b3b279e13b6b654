"""Position samplers: where the positions fed to a positional encoding come from.

A sampler turns (batch size, length) into positions `pos_BL`; the positional encoding
(attn/pe/) decides what a position means. Keeping the two apart makes "randomized RoPE"
a config combination (pe=rope, positions=randomized) rather than a new class.

Positions from the task. A task may put position ids in its batch (`batch["positions"]`,
int32 BT: Abacus digit places, coupled positions; experiments/tasks); the model hands them to
the sampler as `base_BL`, and the sampler transforms them instead of 0..L-1. With task
positions, id 0 means "no position" (Abacus' non-digit tokens, position coupling's BOS/EOS):
every sampler leaves it at 0 and maps the ids >= 1 by a strictly increasing map into
[1, ...), so tokens that share an id keep sharing one and order is kept. Without task
positions every slot is moved, as before. Task ids are < L (a task's contract), so
`max_position(L)` bounds them too.

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
- "offset": a random offset k added during training, the same k for the whole batch (the
  Abacus reference code, McLeish et al. 2024, "Transformers Can Do Arithmetic with the Right
  Embeddings", arXiv 2405.17399: k ~ U{0..99}) or one per sequence (`per_sequence=True`:
  position coupling, Cho et al. 2024, "Position Coupling: Improving Length Generalization of
  Arithmetic Transformers Using Task Structure", arXiv 2405.20671, whose reference code draws
  a random start per example). k ~ U{0..max_offset}; with `max_len` > 0 also
  k <= max_len - 1 - (the row's largest id), so every id stays inside a table of max_len rows
  (position coupling's start in [1, max_pos - len]); `max_offset=-1` leaves only that bound.
  Off at evaluation unless `at_eval=True`.

Interface (README "Interfaces"): `cls(cfg)`, `sampler(batch_size, length, *, train, rng,
valid_B=None, base_BL=None) -> pos_BL`, `sampler.max_position(length) -> int`. Padding is on
the right, so the positions of real tokens do not depend on how much padding follows.
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
        base_BL: jax.Array | None = None,
    ) -> jax.Array:
        """pos_BL. `valid_B`: real tokens per row (right padding); None means all `length`.
        `base_BL`: position ids from the task (module docstring); None means 0..L-1."""
        raise NotImplementedError

    def max_position(self, length: int) -> int:
        raise NotImplementedError


def _identity(batch_size: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))


def _base(batch_size: int, length: int, base_BL) -> jax.Array:
    """The positions a sampler transforms: the task's, else 0..L-1."""
    if base_BL is None:
        return _identity(batch_size, length)
    return jnp.asarray(base_BL, jnp.int32)


class Identity(Sampler):
    """Positions 0..L-1 for every sequence (the task's positions when it gives them)."""

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None, base_BL=None):
        del train, rng, valid_B
        return _base(batch_size, length, base_BL)

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

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None, base_BL=None):
        if not self._active(train):
            return _base(batch_size, length, base_BL)
        max_len = self.cfg["max_len"]
        require(
            length <= max_len,
            "positions.max_len",
            f"length {length} is longer than max_len {max_len}; raise max_len",
        )
        if rng is None:
            raise ValueError("randomized positions need an rng (the 'positions' stream)")
        if base_BL is not None:
            base_BL = jnp.asarray(base_BL, jnp.int32)
            return self._map_task_positions(batch_size, length, rng, base_BL)
        if self.cfg["per_sequence"]:
            keys = jax.random.split(rng, batch_size)
            counts = jnp.full((batch_size,), length) if valid_B is None else valid_B
            return jax.vmap(lambda key, n: sorted_subset(key, length, max_len, n))(keys, counts)
        # One vector per batch (Ruoss et al.'s code): sized for the longest real row.
        count = None if valid_B is None else jnp.max(valid_B)
        return jnp.broadcast_to(sorted_subset(rng, length, max_len, count), (batch_size, length))

    def _map_task_positions(self, batch_size, length, rng, base_BL):
        """Task id p >= 1 -> the p-th smallest of a sorted random subset of [0, max_len)
        (which is >= p >= 1); id 0 stays 0."""
        if self.cfg["per_sequence"]:
            keys = jax.random.split(rng, batch_size)
            subset_BL = jax.vmap(lambda key: sorted_subset(key, length, self.cfg["max_len"]))(keys)
        else:
            subset_L = sorted_subset(rng, length, self.cfg["max_len"])
            subset_BL = jnp.broadcast_to(subset_L, (batch_size, length))
        idx = jnp.clip(base_BL, 0, length - 1)
        return jnp.where(base_BL > 0, jnp.take_along_axis(subset_BL, idx, axis=1), 0)

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

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None, base_BL=None):
        del train, rng, valid_B
        pos = _base(batch_size, length, base_BL).astype(jnp.float32)
        return pos * jnp.float32(self.cfg["factor"])

    def max_position(self, length: int) -> int:
        return math.ceil((length - 1) * self.cfg["factor"])


class Offset(Sampler):
    """McLeish et al. 2024 (Abacus) and Cho et al. 2024 (position coupling): a random
    offset k added to every position while training (module docstring)."""

    DEFAULTS = {"max_offset": 99, "max_len": 0, "per_sequence": False, "at_eval": False}

    def __init__(self, cfg):
        super().__init__(cfg)
        k, max_len = self.cfg["max_offset"], self.cfg["max_len"]
        require(
            isinstance(k, int) and k >= -1,
            "positions.max_offset",
            f"an int >= 0 (or -1: bounded by max_len alone), got {k!r}",
        )
        require(
            isinstance(max_len, int) and max_len >= 0,
            "positions.max_len",
            f"an int >= 0 (0: no table bound), got {max_len!r}",
        )
        require(
            k >= 0 or max_len > 0,
            "positions.max_offset",
            "-1 (bounded by max_len alone) needs positions.max_len > 0",
        )

    def __call__(self, batch_size, length, *, train, rng=None, valid_B=None, base_BL=None):
        pos = _base(batch_size, length, base_BL)
        if not (train or self.cfg["at_eval"]):
            return pos
        if rng is None:
            raise ValueError("offset positions need an rng (the 'positions' stream)")
        big = jnp.iinfo(jnp.int32).max
        top_B = jnp.max(pos, axis=1)
        if valid_B is not None and base_BL is None:  # padding slots carry no position
            top_B = jnp.minimum(top_B, jnp.maximum(valid_B - 1, 0))
        limit_B = jnp.full(
            (batch_size,), big if self.cfg["max_offset"] < 0 else self.cfg["max_offset"]
        )
        if self.cfg["max_len"]:
            limit_B = jnp.minimum(limit_B, self.cfg["max_len"] - 1 - top_B)
        limit_B = jnp.maximum(limit_B, 0)
        if self.cfg["per_sequence"]:
            u_B = jax.random.uniform(rng, (batch_size,))
        else:
            u_B = jnp.broadcast_to(jax.random.uniform(rng, ()), (batch_size,))
        # floor(u * (limit + 1)) is uniform on {0..limit}; float32 is exact enough here
        k_B = jnp.minimum(
            jnp.floor(u_B * (limit_B.astype(jnp.float32) + 1.0)).astype(jnp.int32), limit_B
        )
        moved = pos + k_B[:, None]
        return moved if base_BL is None else jnp.where(pos > 0, moved, 0)

    def max_position(self, length: int) -> int:
        if self.cfg["max_len"]:
            return max(self.cfg["max_len"], length) - 1
        return length - 1 + self.cfg["max_offset"]


REGISTRY: dict[str, type[Sampler]] = {
    "identity": Identity,
    "randomized": Randomized,
    "interpolated": Interpolated,
    "offset": Offset,
}


def default_config(name: str) -> dict:
    """The full config block of sampler `name`: {"name": name, **DEFAULTS}."""
    return {"name": name, **lookup(REGISTRY, name, "positions.name").DEFAULTS}


def build(cfg: Mapping[str, Any]) -> Sampler:
    """Build the sampler named cfg["name"] from its config block."""
    return lookup(REGISTRY, cfg["name"], "positions.name")(cfg)
