"""Every configuration check that can fail, before anything is compiled, and the eval grid.

- `validate(config, *, workdir=None, eval_lengths=None)`: ConfigError (one line naming the
  field and what is allowed) for anything the run would trip over later: task and model
  layouts, training and evaluation fields, the optimizer and schedule blocks, the model block
  at the longest padded length any batch will have, and the mesh.
- `resolve_eval_lengths(config, lengths=None, *, during_training=False)`: the lengths an
  evaluation runs at.
- `run_identity(config, workdir) -> {field: (old, new)}`: a workdir is one run; re-running it
  with another config is a ConfigError naming the changed fields, unless only fields that may
  change on resume changed (RESUMABLE: more steps, logging and checkpoint cadence, the mesh,
  evaluation settings), which are returned so the driver can record them.
"""

import json
import os

import jax

import attn.models
from attn.registry import ConfigError, lookup, require
from experiments import mesh, optim, tasks
from experiments.tasks.layouts import padded_length
from experiments.workdir import RunError, ensure_writable_dir


def resolve_eval_lengths(config, lengths=None, *, during_training=False) -> list[int]:
    """The eval grid: explicit lengths, "auto" (1, 2, 4, 8, 16 x the longest training length),
    or "task" (the task's own eval_lengths). During training: `train.eval_lengths`
    ("auto": 1x and 2x the longest training length)."""
    task = tasks.build(config.task)
    n = task.max_train_length
    spec = lengths
    if spec is None:
        spec = config.train.eval_lengths if during_training else config.eval.lengths
    field = "train.eval_lengths" if during_training else "eval.lengths"
    if isinstance(spec, str):
        if spec == "auto":
            return [n, 2 * n] if during_training else [n * k for k in (1, 2, 4, 8, 16)]
        if spec == "task":
            return [int(v) for v in task.cfg["eval_lengths"]]
        try:
            spec = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{field}: {spec!r}; 'auto', 'task' or e.g. '40,80,160'") from None
    spec = [int(v) for v in spec]
    require(bool(spec), field, "no lengths; 'auto', 'task' or e.g. '40,80,160'")
    require(min(spec) > 0, field, f"length {min(spec)} <= 0; lengths must be positive")
    return spec


# Fields a resumed run may change; anything else makes it another run.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_lengths",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.mesh.",
    "train.skip_nonfinite",
    "train.max_skipped",
    "train.profile_steps",
    "eval.",
)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{path}."))
        else:
            out[path] = list(v) if isinstance(v, tuple) else v
    return out


def read_config_json(path: str) -> dict:
    """A workdir's config.json as a dict; ConfigError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable config ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a config (a JSON object was expected)")
    return data


def config_changes(config, workdir: str) -> tuple[dict, dict]:
    """({field: (old, new)} of resumable fields, the same of every other field) between
    `config` and workdir/config.json (both empty when there is no config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}, {}
    old = _flatten(read_config_json(path))
    new = _flatten(json.loads(json.dumps(config.to_dict(), default=list)))
    changed = {
        k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }
    fixed = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE)}
    return {k: v for k, v in changed.items() if k not in fixed}, fixed


def describe_changes(changes: dict, limit: int = 4) -> str:
    shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit])
    return shown + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


def run_identity(config, workdir: str) -> dict:
    """{field: (old, new)} of resumable fields that differ from workdir/config.json; a
    ConfigError naming the other changed fields (before anything is written)."""
    resumable, fixed = config_changes(config, workdir)
    if fixed:
        raise ConfigError(
            f"--workdir: {workdir} holds a run of another config: {describe_changes(fixed)}; "
            "use a new workdir, or the run's own config (config.json)"
        )
    return resumable


# Copies of the L x S logits a materialising implementation holds at once (logits,
# probabilities, a mask or bias of the same size).
MATERIALISED_COPIES = 3


def machine_memory() -> int:
    """Bytes one device can hold: the accelerator's limit, else the host's physical memory."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config, task, layout, lengths) -> None:
    """ConfigError when the longest evaluation's (or training's) attention logits alone would
    not fit in the machine's memory: the implementations that materialise B x H x L x S
    logits (reference, dense, xla, and auto for encodings and scorers that need them). The
    chunked, cuDNN and flash paths hold O(L) and are not estimated."""
    m = config.model
    if "num_heads" not in m or "impl" not in m:
        return  # recurrent and state-space models hold no attention logits
    import attn.pe
    import attn.scoring

    needs = getattr(attn.pe.REGISTRY.get(m.pe.name), "needs_materialized_logits", False)
    scorer = attn.scoring.REGISTRY.get(m.scorer.name)
    needs = needs or getattr(scorer, "materialises_logits", False)
    if not (m.impl in ("reference", "dense", "xla") or (m.impl == "auto" and needs)):
        return
    have = machine_memory()
    for what, batch, n in (
        ("evaluating", config.eval.batch_size, max(lengths)),
        ("training", config.train.batch_size, task.max_train_length),
    ):
        T = padded_length(task, layout, n)
        need = MATERIALISED_COPIES * batch * m.num_heads * T * T * 4
        if need > have:
            raise ConfigError(
                f"model.impl: {what} at length {n} (batch {batch}) with impl {m.impl!r} needs "
                f"about {need / 2**30:.1f} GiB of attention logits; this machine has "
                f"{have / 2**30:.1f} GiB; lower the batch size or the lengths, or use "
                "model.impl=chunked"
            )


def validate(config, *, workdir: str | None = None, eval_lengths=None) -> None:
    """Every configuration check that can fail, before anything is compiled."""
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    if layout not in task.layouts:
        raise ConfigError(
            f"model.name: {config.model.name!r} eats the {layout!r} layout, which task "
            f"{task.name!r} does not provide; layouts: {', '.join(task.layouts)}"
        )
    t = config.train
    require(config.seed >= 0, "seed", f"must be >= 0, got {config.seed}")
    require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    for field in ("log_every", "ckpt_every"):
        require(t[field] > 0, f"train.{field}", f"must be positive, got {t[field]}")
    require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
    require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    for field, registry, block in (
        ("train.optimizer", optim.OPTIMIZERS, t.optimizer),
        ("train.schedule", optim.SCHEDULES, t.schedule),
    ):
        want = set(lookup(registry, block.name, f"{field}.name").DEFAULTS) | {"name"}
        require(
            set(block.keys()) == want,
            field,
            f"fields {sorted(block.keys())} do not match {block.name!r}; expected "
            f"{sorted(want)} (pick it with the config arg, not an override)",
        )
    require(t.optimizer.lr > 0, "train.optimizer.lr", f"must be positive, got {t.optimizer.lr}")
    require(
        config.eval.batch_size > 0, "eval.batch_size", f"must be positive: {config.eval.batch_size}"
    )
    require(
        config.eval.num_examples > 0,
        "eval.num_examples",
        f"must be positive, got {config.eval.num_examples} (an evaluation of nothing)",
    )
    lengths = resolve_eval_lengths(config, eval_lengths)
    if t.eval_every:
        lengths = lengths + resolve_eval_lengths(config, during_training=True)
    longest = max(padded_length(task, layout, n) for n in [task.max_train_length, *lengths])
    attn.models.validate(config.model, vocab_size=task.vocab_size, max_length=longest)
    check_memory(config, task, layout, lengths)
    data, _ = mesh.mesh_shape(config)
    require(
        t.batch_size % data == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by the mesh data axis ({data})",
    )
    require(
        t.batch_size % jax.process_count() == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by the process count ({jax.process_count()})",
    )
    if workdir is not None:
        try:
            ensure_writable_dir(workdir)
        except RunError as e:
            raise ConfigError(f"--workdir: {e}") from None
