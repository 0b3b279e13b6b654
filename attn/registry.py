"""Name -> builder registries and the one error type for bad configuration.

Every registry in the project (PEs, position samplers, scorers, models, tasks, optimizers,
schedules) is a plain module-level dict named REGISTRY. `lookup` is the only way code turns
a configured name into a builder, so an unknown name fails the same way everywhere: one
line naming the config field and the valid choices, before anything is compiled.
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


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(f'{field}: {message}') unless condition holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
