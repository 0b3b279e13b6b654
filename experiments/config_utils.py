"""Config helpers shared by the configs/ files, the driver and the entry point.

- `parse_arg("task=reverse_string,pe=rope", allowed)`: the `k=v,k=v` structural argument of a
  config file (`--config configs/formal.py:task=reverse_string,pe=rope`), unknown keys rejected.
- `block(registry, name, field, **overrides)`: a `{"name": name, **DEFAULTS}` config block
  for one registry entry (README "Interfaces"), failing with ConfigError on an unknown name
  or field.
- `load_json` / `to_json`: the `workdir/config.json` round trip (locked ConfigDict).
- `describe_error(exc, argv)`: any failure of flag/config parsing -> one user-facing line and the
  exit status (2: bad configuration), so that `experiments/main.py` never prints a traceback.

Configs follow the ml_collections convention of big_vision and the Flax examples (a
`get_config(arg)` per file, scalar overrides as `--config.a.b=v`).
"""

import argparse
import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from attn.registry import ConfigError, lookup, merge_defaults


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the command-line tools: a bad argument is one line (`prog: error: ...`,
    no usage block) and exit status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def check(self, condition: bool, flag: str, message: str) -> None:
        """One line naming `flag` (exit 2) unless condition holds."""
        if not condition:
            self.error(f"{flag}: {message}")


def parse_arg(arg: str | None, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """Parse 'k=v,k=v' over `allowed` (key -> default). Unknown or malformed keys: ConfigError.

    Values keep their string form unless the default is an int, float or bool; an empty
    value (`pe=`) keeps the file's default.
    """
    values = dict(allowed)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config arg: {item!r} is not k=v; keys: {', '.join(allowed)}")
        if key not in allowed:
            raise ConfigError(f"config arg: unknown key {key!r}; keys: {', '.join(allowed)}")
        if value.strip():
            values[key] = _coerce(key, value.strip(), allowed[key])
    return values


def _coerce(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"config arg {key}: {value!r} is not a bool; use true or false")
        return value.lower() in ("true", "1")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"config arg {key}: {value!r} is not {kind.__name__}") from None
    return value


def block(
    registry: Mapping[str, Any], name: str, field: str, **overrides: Any
) -> ml_collections.ConfigDict:
    """`{"name": name, **DEFAULTS, **overrides}` for `registry[name]` as a ConfigDict."""
    cls = lookup(registry, name, f"{field}.name")
    merged = merge_defaults(getattr(cls, "DEFAULTS", {}), {"name": name, **overrides}, field)
    return ml_collections.ConfigDict({"name": name, **merged})


def apply_mini(config: ml_collections.ConfigDict, mini: Mapping[str, Any]) -> None:
    """Set a reproduction's mini protocol: its steps, batch and eval set, no periodic eval.

    `mini` holds "steps", "batch_size", "num_examples" and optionally "max_length" (training
    lengths) and "eval_lengths"; checkpoints every 500 steps keep a killed mini resumable.
    """
    config.train.steps = mini["steps"]
    config.train.batch_size = mini["batch_size"]
    config.train.eval_every = 0
    config.train.log_every = 50
    config.train.ckpt_every = 500
    config.eval.num_examples = mini["num_examples"]
    if "max_length" in mini:
        config.task.max_length = mini["max_length"]
    if "eval_lengths" in mini:
        config.eval.lengths = ",".join(map(str, mini["eval_lengths"]))


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    return str(obj)


def load_json(path: str) -> ml_collections.ConfigDict:
    """The config saved in a workdir, as a locked ConfigDict (the schema it was run with);
    ConfigError naming the file if it is not readable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable config ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a config (a JSON object was expected)")
    config = ml_collections.ConfigDict(data)
    config.lock()
    return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without `--config.a.b=v` items, ["a.b=v", ...]): the overrides of a mode that has
    no config file (eval applies them to the run's config.json)."""
    rest, overrides = [], []
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)=(.*)$", arg)
        if m:
            overrides.append(f"{m.group(1)}={m.group(2)}")
        else:
            rest.append(arg)
    return rest, overrides


def _coerce_like(path: str, text: str, current: Any) -> Any:
    if isinstance(current, bool):
        return _coerce(f"config.{path}", text, current)
    if isinstance(current, int | float):
        try:
            return type(current)(text)
        except ValueError:
            kind = type(current).__name__
            raise ConfigError(f"config.{path}: {text!r} is not {kind}") from None
    if isinstance(current, list | tuple) or (current is None and text[:1] in "([{"):
        import ast

        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"config.{path}: {text!r} is not a Python literal") from None
        return list(value) if isinstance(current, list) else value
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> dict:
    """Set "a.b=v" items on a locked config, each value of the field's type; {path: value}.
    An unknown field is a ConfigError naming it and its block's fields."""
    applied = {}
    for item in overrides:
        path, _, text = item.partition("=")
        node, keys = config, path.split(".")
        for i, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *keys[:i]])
                fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
                raise ConfigError(
                    f"config.{'.'.join(keys[: i + 1])}: no such field; fields of {where}: "
                    f"{fields or '(a value)'}"
                )
            if i < len(keys) - 1:
                node = node[key]
        value = _coerce_like(path, text, node[keys[-1]])
        with config.unlocked():
            node[keys[-1]] = value
        applied[path] = value
    return applied


def _block_registries() -> dict[str, Mapping[str, Any]]:
    """Config paths of registry blocks -> their registries (imported on use: they pull JAX)."""
    import attn.pe
    import attn.positions
    import attn.scoring
    from experiments import optim, tasks

    return {
        "task": tasks.REGISTRY,
        "model.pe": attn.pe.REGISTRY,
        "model.positions": attn.positions.REGISTRY,
        "model.scorer": attn.scoring.REGISTRY,
        "model.logit_scale": attn.scoring.LOGIT_SCALES,
        "model.normaliser": attn.scoring.NORMALISERS,
        "train.optimizer": optim.OPTIMIZERS,
        "train.schedule": optim.SCHEDULES,
    }


def overridden_fields(argv: Sequence[str]) -> set[str]:
    """Dotted config paths set on the command line (`--config.a.b=v` -> "a.b")."""
    return {m.group(1) for a in argv if (m := re.match(r"--?(?:no)?config\.([\w.]+)", a))}


def reconcile_blocks(config: ml_collections.ConfigDict, argv: Sequence[str]):
    """Rebuild every registry block whose name the command line changed
    (`--config.train.schedule.name=rsqrt`) from the new entry's DEFAULTS plus the block's
    fields that the command line also set; a set field the new entry lacks is a ConfigError.
    Returns the (locked) config."""
    overridden = overridden_fields(argv)
    for path, registry in _block_registries().items():
        if f"{path}.name" not in overridden:
            continue
        parent_path, key = path.rpartition(".")[::2]
        parent = config
        for part in filter(None, parent_path.split(".")):
            parent = parent[part]
        if key not in parent:
            continue
        block = parent[key]
        cls = lookup(registry, block.name, f"{path}.name")
        given = {k: block[k] for k in block if k != "name" and f"{path}.{k}" in overridden}
        merged = merge_defaults(getattr(cls, "DEFAULTS", {}), {"name": block.name, **given}, path)
        with config.unlocked():
            parent[key] = ml_collections.ConfigDict({"name": block.name, **merged})
    config.lock()
    return config


def parse_lengths(values: Sequence[str] | None) -> list[int] | None:
    """`--lengths 40,80,160` -> [40, 80, 160]; anything but positive integers is a ConfigError."""
    if not values:
        return None
    try:
        lengths = [int(v) for v in values]
    except ValueError:
        raise ConfigError(
            f"--lengths: {','.join(values)!r}; positive integers, e.g. 40,80"
        ) from None
    if min(lengths) <= 0:
        raise ConfigError(f"--lengths: {min(lengths)} <= 0; lengths must be positive")
    return lengths


def parse_flags(flag_values, argv: list[str], overrides_out: list[str]):
    """absl flag parsing for experiments.main: (remaining argv, None), or (argv, (one line,
    exit status)) on any failure. `--config.a.b=v` items given without a config file (eval's
    overrides of the run's config.json) go to `overrides_out` instead of absl."""
    try:
        if not any(a == "--config" or a.startswith("--config=") for a in argv):
            argv, overrides_out[:] = split_overrides(argv)
        rest = flag_values(argv)
        if flag_values.mode == "train" or flag_values["config"].present:
            flag_values.config.get("seed")  # a missing file only raises when first read
    except Exception as e:  # every parse failure becomes one line, never a traceback
        return argv, describe_error(e, argv)
    return rest, None


def describe_error(exc: BaseException, argv: Sequence[str]) -> tuple[str, int]:
    """One line (field, problem, allowed values) and exit status for a parse-time failure."""
    # ml_collections re-raises a get_config error as the same type wrapping a traceback:
    # the deepest ConfigError is the original.
    config_errors = [e for e in _chain(exc) if isinstance(e, ConfigError)]
    if config_errors:
        return str(config_errors[-1]).splitlines()[0], 2
    missing = _missing_override(argv)
    if missing:
        return missing, 2
    config_arg = _flag_value(argv, "config")
    path = (config_arg or "").split(":", 1)[0]
    text = str(exc)
    if path and ("Failed loading config file" in text or isinstance(exc, OSError)):
        return f"--config: cannot read {path!r}; config files: {_config_files()}", 2
    if isinstance(exc, AttributeError) and "get_config" in text:
        return f"--config: {path!r} defines no get_config(arg)", 2
    m = re.search(r"flag --(config\.[\w.]+)=([^:]*): (.*)", text)
    if m:
        return f"{m.group(1)}: cannot set to {m.group(2)!r} ({m.group(3).strip()})", 2
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first, 2


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_files() -> str:
    files = sorted(glob.glob(os.path.join("configs", "*.py")))
    return ", ".join(f for f in files if not f.endswith("__init__.py")) or "(none in ./configs)"


def _missing_override(argv: Sequence[str]) -> str | None:
    """'config.a.b: no such field; fields of config.a: ...' for the first unknown override."""
    from ml_collections.config_flags import config_flags

    spec = _flag_value(argv, "config")
    try:
        config = config_flags.ConfigFileFlagParser("config").parse(spec) if spec else None
    except Exception:  # the config file itself is the problem: reported by the caller
        return None
    if not isinstance(config, ml_collections.ConfigDict):
        return None
    for arg in argv:
        m = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
        if not m:
            continue
        node, path = config, m.group(1).split(".")
        for i, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *path[:i]])
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                allowed = (
                    f"fields of {where}: {', '.join(fields)}" if fields else f"{where} is a value"
                )
                block = ".".join(path[:i])
                if "name" in fields and block in _block_registries():
                    arg = block.rsplit(".", 1)[-1]
                    allowed += (
                        f" (those of {node['name']!r}); another entry's fields come with the "
                        f"config arg, e.g. {spec.split(':', 1)[0]}:{arg}=NAME"
                    )
                return f"config.{'.'.join(path[: i + 1])}: no such field; {allowed}"
            node = node[key]
    return None
