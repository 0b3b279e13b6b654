"""Reproduction: "Train Short, Test Long" (Press et al. 2022, ALiBi, arXiv 2108.12409),
byte-level language modelling at one context length, evaluated at 1x..16x of it.

Protocol (as the paper describes it; built on configs/lm.py, which holds the causal decoder and the
corpus): train a decoder on windows of `context` bytes of a text corpus (this Python's standard
library sources, TFDS `attn_text`; the paper uses WikiText-103 tokens), evaluate perplexity on
non-overlapping chunks of 1, 2, 4, 8 and 16 x context, for every encoding: none, sinusoidal, learned
(its table sized to 16 x context, so positions past the training length exist but were never
trained), T5 bias, ALiBi and RoPE. Deviations, recorded: bytes of Python source instead of
WikiText-103 words; size m (6 layers x 256) instead of the paper's 247M-parameter model; context 512
(the paper's shorter setting); one seed.

Arg keys: those of configs/lm.py (pe, sampler, scorer, size, smoke) plus context (int: training
length in bytes) and mini (bool: the reduced protocol, MINI below); size and context default
to the protocol's (m and 512; MINI's with mini=true).

  # one run
  ./launch.sh train --config configs/press_lm.py:pe=alibi --workdir runs/press/one
  # full grid: 6 encodings at context 512, 20k steps each
  ./launch.sh sweep --config configs/press_lm.py --workdir runs/press_lm
  # mini grid on 2 CPU cores
  ./launch.sh sweep --config configs/press_lm.py:mini=true --workdir runs/press_lm_mini --parallel 2
  ./launch.sh compare runs/press_lm_mini --out reports/press_lm_mini --metric ppl

Expected wall time: full, an accelerator job (6 runs of 20k steps at batch 32 x 512 bytes).
Mini: minutes for the 6 runs, 2 at once on 2 CPU cores (RESULTS.md has the measured time).
Expected result (paper): ALiBi's perplexity stays flat or improves up to 16x the training
length; sinusoidal (and learned) explode just past it; RoPE and T5 degrade in between.
"""

from configs import lm
from experiments import claims, config_utils

ENCODINGS = ("none", "sinusoidal", "learned", "t5", "alibi", "rope")
EXTRAPOLATION = (1, 2, 4, 8, 16)

# The reduced protocol: a small decoder on 64-byte windows, evaluated on 64..1024 bytes. Sized
# so that sinusoidal can overfit its positions (a 2 x 32 model could not: its perplexity at 4x
# stayed within 1.13x of 1x); RESULTS.md lists the sizes tried.
MINI = {
    "model": {"num_layers": 3, "d_model": 128, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 512},
    "context": 64,
    "steps": 1200,
    "batch_size": 16,
    "num_examples": 32,
}

# size "" and context 0 mean "the protocol's" (full or mini); any other value overrides it.
ARGS = {**lm.ARGS, "pe": "none", "size": "", "context": 0, "mini": False}


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    mini, context = args.pop("mini"), args.pop("context")
    mini_model = mini and not args["size"]
    args["size"] = args["size"] or ("xs" if mini else "m")
    context = context or (MINI["context"] if mini else 512)
    config = lm.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    config.task.min_length = config.task.max_length = context
    config.eval.lengths = ",".join(str(k * context) for k in EXTRAPOLATION)
    if "max_len" in config.model.pe:
        config.model.pe.max_len = max(config.model.pe.max_len, EXTRAPOLATION[-1] * context)
    if mini_model:
        for key, value in MINI["model"].items():
            config.model[key] = value
    if mini:
        config_utils.apply_mini(config, MINI)
        config.eval.batch_size = MINI["num_examples"]
    return config


def get_sweep(arg: str | None = None):
    return {"pe": ENCODINGS, "seed": [0]}


CLAIMS_METRIC = "ppl"


def get_claims(arg: str | None = None):
    """The paper's findings as checks on compare's rows (./launch.sh reproduce press)."""
    paper = "Press et al. 2022, Fig. 1 (WikiText-103, trained on 512 tokens)"
    return [
        claims.ratio(
            "ALiBi's perplexity at 16x the training length is within 15 % of its 1x",
            f"{paper}: ALiBi stays flat (or improves) far past the training length",
            pe="alibi", metric="ppl", at="16x", over="1x", below=1.15,
        ),
        claims.ratio(
            "sinusoidal's perplexity at 4x the training length is more than twice its 1x",
            f"{paper}: sinusoidal explodes right past the training length",
            pe="sinusoidal", metric="ppl", at="4x", over="1x", above=2.0,
        ),
        claims.better(
            "ALiBi's out-of-distribution perplexity is lower than sinusoidal's",
            paper, a={"pe": "alibi"}, b={"pe": "sinusoidal"}, metric="ppl",
        ),
        claims.better(
            "RoPE degrades less than sinusoidal beyond the training length",
            f"{paper}: rotary and T5 degrade between ALiBi and sinusoidal",
            a={"pe": "rope"}, b={"pe": "sinusoidal"}, metric="ppl",
        ),
        claims.better(
            "ALiBi extrapolates better than RoPE",
            f"{paper}: ALiBi is the only one that stays flat",
            a={"pe": "alibi"}, b={"pe": "rope"}, metric="ppl",
        ),
    ]  # fmt: skip
