"""Per-layer choices of positional encoding and attention window: `model.layers`.

Yang et al. 2025, "Rope to Nope and Back Again: A New Hybrid Attention Strategy" (arXiv
2501.18795; RNoPE-SWA) interleave NoPE layers with full attention and RoPE layers with a
sliding window, as do Llama 4's NoPE layers. `model.layers` is a pattern repeated cyclically
over the layers of every stack:

    "rope:window=128,none"   layers 0, 2, 4, ...: RoPE, window 128; layers 1, 3, ...: NoPE, full

An entry is `<encoding>[:key=value]...`; the keys are `window` (0 = none; default
model.window) and the encoding's own fields (`rope:max_wavelength=500:window=64`), each value
read as the type of the field's default. Entries are separated by ',' or, inside a config arg
whose commas separate the arg's keys, by '+' (`configs/algorithmic.py:layers=rope:window=8+none`).
"" (the default) means every layer uses model.pe and model.window.

With a pattern every layer builds its own encoding (attn.layers.Block's `own_pe`), so learned
encodings get parameters per layer, and model.pe only supplies the embedding hook: it must be
none or an absolute encoding (sinusoidal, learned). An encoding that declares `per_layer`
(FoX, DAPE) is built per layer with or without a pattern. Every check below raises a one-line
ConfigError naming model.layers (or the field at fault) before anything compiles.
"""

import functools
import re
from collections.abc import Mapping
from typing import Any

import attn.pe
from attn.pe.base import PositionalEncoding
from attn.registry import ConfigError, lookup, require

FIELD = "model.layers"


def _coerce(entry: str, key: str, value: str, default: Any) -> Any:
    """value read as the type of `default` (bool, int, float or str)."""
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return value
    except ValueError:
        raise ConfigError(
            f"{FIELD}: {entry!r}: {key}={value!r} is not a {type(default).__name__} "
            f"(the type of its default {default!r})"
        ) from None


@functools.lru_cache(maxsize=64)
def parse(spec: str) -> tuple[tuple[dict, int | None], ...]:
    """The pattern's entries: ((pe block with DEFAULTS filled in, window or None), ...).

    window None means "model.window"; 0 means no window.
    """
    entries = [e.strip() for e in re.split(r"[,+]", spec) if e.strip()]
    require(bool(entries), FIELD, f"{spec!r} has no entries; e.g. 'rope:window=128,none'")
    out = []
    for entry in entries:
        name, *options = entry.split(":")
        cls = lookup(attn.pe.REGISTRY, name.strip(), FIELD)
        fields, window = dict(cls.DEFAULTS), None
        for option in options:
            key, sep, value = (part.strip() for part in option.partition("="))
            require(bool(sep), FIELD, f"{entry!r}: options are key=value, got {option!r}")
            if key == "window":
                window = _coerce(entry, key, value, 0)
                require(window >= 0, FIELD, f"{entry!r}: window must be >= 0 (0: none)")
            elif key in cls.DEFAULTS:
                fields[key] = _coerce(entry, key, value, cls.DEFAULTS[key])
            else:
                allowed = ", ".join(["window", *sorted(cls.DEFAULTS)])
                raise ConfigError(
                    f"{FIELD}: {entry!r}: unknown option {key!r} for {name!r}; allowed: {allowed}"
                )
        out.append(({"name": name.strip(), **fields}, window))
    return tuple(out)


def pe_class(cfg: Mapping[str, Any]) -> type[PositionalEncoding]:
    return lookup(attn.pe.REGISTRY, cfg["pe"]["name"], "model.pe.name")


def owns_pe(cfg: Mapping[str, Any]) -> bool:
    """Whether each block builds its own encoding (a pattern, or a per_layer encoding)."""
    return bool(cfg.get("layers")) or pe_class(cfg).per_layer


def shared_pe_config(cfg: Mapping[str, Any]) -> dict:
    """The encoding the model shares across layers (and whose `embed` hook it applies).

    A per_layer encoding lives in the blocks only, so the shared one is then NoPE.
    """
    return {"name": "none"} if pe_class(cfg).per_layer else dict(cfg["pe"])


def layer_config(cfg: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    """The model block as layer `index` of a stack sees it: its pattern entry's pe and window."""
    if not cfg.get("layers"):
        return cfg
    entries = parse(cfg["layers"])
    pe, window = entries[index % len(entries)]
    return {**cfg, "pe": dict(pe), "window": cfg["window"] if window is None else window}


def acts_on_logits(cls: type[PositionalEncoding]) -> bool:
    return cls.rotate is not PositionalEncoding.rotate or cls.bias is not PositionalEncoding.bias


def validate(
    cfg: Mapping[str, Any],
    *,
    max_eval_position: int | None,
    num_heads: int,
    head_dim: int,
    materialised_ok: bool,
) -> None:
    """ConfigError for an impossible pattern (cfg resolved). `materialised_ok`: whether the
    configured impl can run an encoding that needs materialised logits."""
    spec = cfg.get("layers") or ""
    require(isinstance(spec, str), FIELD, f"a string such as 'rope:window=128,none', got {spec!r}")
    if not spec:
        return
    require(
        not cfg.get("scan_layers"),
        "model.scan_layers",
        "a per-layer pattern (model.layers) gives layers different encodings and windows, "
        "which nnx.scan cannot stack; set scan_layers=False",
    )
    shared = pe_class(cfg)
    if acts_on_logits(shared) or shared.per_layer:
        raise ConfigError(
            f"model.pe.name: {cfg['pe']['name']!r} acts on attention logits, which "
            f"{FIELD} ({spec!r}) chooses per layer; set model.pe to none or an absolute "
            "encoding (sinusoidal, learned) for the embeddings"
        )
    for pe, _ in parse(spec):
        cls = attn.pe.get(pe["name"])
        if cls.embed is not PositionalEncoding.embed:
            raise ConfigError(
                f"{FIELD}: {pe['name']!r} is an absolute encoding (embed hook), which acts once "
                "on the embeddings, not per layer; set it as model.pe"
            )
        if cls.needs_materialized_logits and not materialised_ok:
            raise ConfigError(
                f"model.impl: {cfg['impl']!r} cannot run {pe['name']!r} of {FIELD}, which "
                "needs materialised logits; use impl='reference' or 'auto'"
            )
        if cfg.get("cross_pe") and not cls.supports_cross_attention:
            raise ConfigError(
                f"model.cross_pe: {pe['name']!r} of {FIELD} does not support cross attention; "
                "set cross_pe=False"
            )
        if max_eval_position is not None:
            cls.validate(
                pe, max_eval_position=max_eval_position, num_heads=num_heads, head_dim=head_dim
            )
