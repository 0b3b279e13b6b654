"""Name -> builder registries and the one error type for bad configuration.

Every registry in the project (PEs, position samplers, scorers, models, tasks, optimizers,
schedules) is a plain module-level dict from name to a class with a `DEFAULTS` dict (its
config fields). `lookup` is the only way code turns a configured name into a builder, and
`merge_defaults` the only way a config block `{"name": ..., field: value}` meets the entry's
DEFAULTS, so an unknown name or field fails the same way everywhere: one line naming the
config field and the valid choices, before anything is compiled.
"""

from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value that is not allowed; one-line message: field, problem, allowed."""


def lookup(registry: Mapping[str, Any], name: str, field: str) -> Any:
    """Return registry[name], or raise ConfigError naming `field` and the valid names."""
    if name not in registry:
        valid = ", ".join(sorted(registry))
        raise ConfigError(f"{field}: unknown name {name!r}; valid names: {valid}")
    return registry[name]


def as_dict(block: Any) -> dict:
    """A config block (dict or ml_collections ConfigDict) as a plain dict."""
    return dict(block.to_dict() if hasattr(block, "to_dict") else block)


def merge_defaults(defaults: Mapping[str, Any], block: Any, field: str) -> dict:
    """`{**defaults, **block}` without the block's "name"; a field that `defaults` does not
    have is a ConfigError naming `field`.<key> and the allowed fields."""
    given = as_dict(block or {})
    name = given.pop("name", None)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(f"{field}.{unknown[0]}: unknown field for {name!r}; allowed: {allowed}")
    return {**defaults, **given}


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(f'{field}: {message}') unless condition holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
