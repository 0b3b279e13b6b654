"""Base config: the full locked schema (README "Interfaces") every experiment starts from.

The family configs (formal.py, algorithmic.py, lm.py, seq2seq.py) call `build(...)` with their
own defaults; this file also runs on its own:

  python -m experiments.main --config configs/base.py:pe=rope --workdir runs/base_rope

Structural choices are the `k=v` arg (`ARGS` lists the keys): task, model, pe, sampler, scorer,
optimizer, schedule, size, smoke; each brings its registry entry's defaults, e.g.
`configs/formal.py:pe=rope,optimizer=adamw,schedule=cosine`. An override of a block's name
(`--config.train.schedule.name=rsqrt`) does the same: the block is rebuilt from the new entry's
defaults plus the fields given on the command line. Every other field is a scalar override,
e.g. `--config.model.pe.max_wavelength=500 --config.train.steps=2000`. The pe / positions /
scorer / task blocks are `{"name": ..., **DEFAULTS}` of that registry entry, so a block only
holds the fields its entry understands and the locked config rejects typos. `smoke=true` gives
tiny sizes and a few steps (tests).

Attention choices of attn.scoring and attn/models_pattern.py are args too: `logit_scale`
(none, log_n, ssmax, temperature), `normaliser` (softmax, stick_breaking) and `layers`, a
per-layer pattern of encodings and windows whose entries are separated by '+' inside the arg
(`configs/algorithmic.py:layers=rope:window=8+none`; `--config.model.layers=rope:window=8,none`
takes commas).

Defaults follow Deletang et al. 2023 (arXiv 2207.02098) where a paper protocol applies:
Adam, gradient clipping 1.0, batch 128, encoder of 5 layers x d_model 64 x 8 heads, MLP 4x ReLU,
post-LN, dropout 0.1, embeddings scaled by sqrt(d), init std 0.02 (size=s).
Expected: see the family configs; this file defaults to formal reverse_string with no PE.
"""

import ml_collections

from attn import models as models_lib
from attn import pe as pe_lib
from attn import positions as positions_lib
from attn import scoring as scoring_lib
from attn.registry import ConfigError
from experiments import config_utils, optim
from experiments import tasks as tasks_lib

ARGS = {
    "task": "reverse_string",
    "model": "encoder",
    "pe": "none",
    "sampler": "",
    "scorer": "",
    "size": "s",
    "smoke": False,
    # "" = the config file's own choice (adam, constant unless the file says otherwise)
    "optimizer": "",
    "schedule": "",
    # "" = the model's default (no logit scale, softmax, model.pe in every layer)
    "logit_scale": "",
    "normaliser": "",
    "layers": "",
}
SMOKE_ARGS = "smoke=true"

# (num_layers, d_model, num_heads, mlp_dim), applied to the fields a model has.
# s = the encoder of Deletang et al. 2023 (~0.25M parameters).
SIZES = {
    "xs": (2, 32, 4, 128),
    "s": (5, 64, 8, 256),
    "m": (6, 256, 8, 1024),
    "l": (12, 768, 12, 3072),
}
SMOKE_MODEL = {"num_layers": 1, "d_model": 16, "num_heads": 2, "num_kv_heads": 2, "mlp_dim": 32}


def _model_block(
    model: str,
    size: str,
    pe: str,
    sampler: str,
    scorer: str,
    logit_scale: str = "",
    normaliser: str = "",
    layers_spec: str = "",
) -> dict:
    """The model registry's block for `model` with the size preset and the chosen sub-blocks."""
    if size not in SIZES:
        raise ConfigError(f"config arg size: {size!r}; sizes: {', '.join(SIZES)}")
    block = models_lib.default_config(model)
    layers, d_model, heads, mlp_dim = SIZES[size]
    preset = {
        "num_layers": layers,
        "d_model": d_model,
        "num_heads": heads,
        "num_kv_heads": heads,
        "mlp_dim": mlp_dim,
    }
    block.update({k: v for k, v in preset.items() if k in block})
    chosen = {
        "pe": (pe_lib.REGISTRY, pe),
        "positions": (positions_lib.REGISTRY, sampler),
        "scorer": (scoring_lib.REGISTRY, scorer),
        "logit_scale": (scoring_lib.LOGIT_SCALES, logit_scale),
        "normaliser": (scoring_lib.NORMALISERS, normaliser),
    }
    for key, (registry, name) in chosen.items():
        if not name:
            continue  # the model's own default
        if key not in block:
            raise ConfigError(f"config arg {key}: model {model!r} has no {key} block")
        block[key] = config_utils.block(registry, name, f"model.{key}").to_dict()
    if layers_spec:
        if "layers" not in block:
            raise ConfigError(f"config arg layers: model {model!r} has no per-layer pattern")
        block["layers"] = layers_spec
    return block


def build(
    *,
    task: str,
    model: str,
    pe: str,
    sampler: str,
    scorer: str,
    size: str,
    smoke: bool,
    optimizer: str = "",
    lr: float = 3e-4,
    schedule: str = "",
    batch_size: int = 128,
    steps: int = 10_000,
    logit_scale: str = "",
    normaliser: str = "",
    layers: str = "",
    **model_overrides,
) -> ml_collections.ConfigDict:
    """The full config for one run; the family configs pass their own defaults."""
    optimizer, schedule = optimizer or "adam", schedule or "constant"
    model_block = _model_block(
        model, size, pe, sampler, scorer, logit_scale, normaliser, layers_spec=layers
    )
    model_block.update(model_overrides)
    variant = "/".join(
        [model_block.get("pe", {}).get("name", "-")]
        + ([sampler] if sampler not in ("", "identity") else [])
        + ([scorer] if scorer else [])
        + [x for x in (logit_scale, normaliser) if x]
        + ([f"layers={layers}"] if layers else [])
    )
    config = ml_collections.ConfigDict(
        {
            "seed": 0,
            "variant": f"{model}:{variant}",
            "task": config_utils.block(tasks_lib.REGISTRY, task, "task").to_dict(),
            "model": model_block,
            "train": {
                "steps": steps,
                "batch_size": batch_size,
                "optimizer": config_utils.block(
                    optim.OPTIMIZERS, optimizer, "train.optimizer", lr=lr
                ).to_dict(),
                "schedule": config_utils.block(
                    optim.SCHEDULES, schedule, "train.schedule"
                ).to_dict(),
                "grad_clip": 1.0,
                "skip_nonfinite": False,
                # with skip_nonfinite: stop once more updates than this were skipped (-1: never)
                "max_skipped": 100,
                "log_every": 100,
                "eval_every": 1000,
                "eval_lengths": "auto",
                "ckpt_every": 1000,
                "keep_checkpoints": 3,
                # k micro-batches per step, gradients summed in the step (batch_size % k == 0)
                "grad_accum_steps": 1,
                # data x fsdp x model devices (-1: the rest); fsdp shards params and optimizer
                # state (experiments/mesh.py RULES), the batch splits over data x fsdp
                "mesh": {"data": -1, "fsdp": 1, "model": 1},
                # "a,b": jax.profiler trace of steps a..b-1 in workdir/profile; "" none
                "profile_steps": "",
                # peak TFLOP/s of one device for the MFU in the logs; 0: the table of known
                # accelerators in experiments/profile.py (none on a CPU)
                "peak_tflops": 0.0,
            },
            "eval": {
                "lengths": "auto",
                "batch_size": 128,
                "num_examples": 512,
                "random_positions": False,
                "compilation_cache": "auto",
                "data_dir": "",
            },
        }
    )
    if smoke:
        shrink(config)
    config.lock()
    return config


def shrink(config: ml_collections.ConfigDict) -> None:
    """Tiny shapes and a few steps: a whole run compiles and finishes in seconds on CPU."""
    m = config.model
    for key, value in SMOKE_MODEL.items():
        if key in m:
            m[key] = value
    if "dropout" in m:
        m.dropout = 0.0
    if "rnn" in m and "hidden" in m.rnn:
        m.rnn.hidden = 16
    t = config.train
    t.steps, t.batch_size, t.log_every, t.eval_every, t.ckpt_every = 3, 8, 1, 0, 2
    if "max_length" in config.task:
        config.task.max_length = min(config.task.max_length, 8)
        config.task.min_length = min(config.task.min_length, config.task.max_length)
    config.eval.lengths = "8,16"
    config.eval.batch_size, config.eval.num_examples = 8, 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return build(**config_utils.parse_arg(arg, ARGS))
