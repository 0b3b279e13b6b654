"""Reproduction: the decoder-only protocol of Kazemnejad et al. 2023 ("The Impact of
Positional Encoding on Length Generalization in Transformers", arXiv 2305.19466).

Protocol (as the paper describes it; built on configs/algorithmic.py, which holds the decoder and
the prompt + SEP + answer layout): causal decoder, loss on the answer tokens only, right padding;
train on lengths up to L (task.max_length, 20 by default), test up to 2L (the task grid 5..40); 3
seeds; exact-match accuracy (seq_acc) per length; the encodings are ranked per task and aggregated
by mean reciprocal rank (compare prints it). Encodings: NoPE (none), T5's relative bias, ALiBi,
RoPE, sinusoidal. Tasks: copy, reverse, sort, addition, summation (mod 10), parity, polynomial
evaluation (mod 10). Deviations, recorded: LEGO, SCAN and PCFG are not implemented in
experiments.tasks; examples are drawn fresh every step instead of from a fixed set of 100k; the
paper's ~138M-parameter model is approximated by size l (12 layers x 768, about 85M parameters plus
embeddings); batch 64, learning rate 1e-4 with 1,000 warmup steps and cosine decay are our choices
(the paper does not give them).

Arg keys: those of configs/algorithmic.py (task, pe, sampler, scorer, model, size, smoke) plus
lr (float) and mini (bool: the reduced protocol, MINI below); size and lr default to the
protocol's (l and 1e-4; MINI's with mini=true).

  # one run
  ./launch.sh train --config configs/kazemnejad.py:task=copy,pe=none --workdir runs/kaz/one
  # full grid (105 runs): 7 tasks x 5 encodings x 3 seeds, 40k steps each
  ./launch.sh sweep --config configs/kazemnejad.py --workdir runs/kazemnejad
  # mini grid on 2 CPU cores
  ./launch.sh sweep --config configs/kazemnejad.py:mini=true --workdir runs/kazemnejad_mini \
      --parallel 2
  ./launch.sh compare runs/kazemnejad_mini --out reports/kazemnejad_mini --metric seq_acc

Expected wall time: full, an accelerator job (105 runs of 40k steps of a ~100M model; seeds of
a shape train together under jax.vmap). Mini (MINI below, 10 runs per seed): minutes per seed
with 2 runs at once on 2 CPU cores (RESULTS.md has the measured time); `seeds=3` runs 3
seeds. Expected result (paper, full protocol): NoPE > T5 > ALiBi > RoPE > sinusoidal by mean
reciprocal rank; all encodings fit the training lengths and degrade beyond them. The authors'
own 3-layer width-64 models failed even in distribution, so the mini protocol (a tiny model
trained for minutes) tests the pipeline and the easy tasks, not the ranking.
"""

from configs import algorithmic
from experiments import claims, config_utils

TASKS = ("copy", "reverse", "sort", "addition", "summation", "parity", "polynomial")
ENCODINGS = ("none", "t5", "alibi", "rope", "sinusoidal")
SEEDS = (0, 1, 2)

# The reduced protocol: four tasks a 2-layer width-32 decoder (size xs) fits in distribution
# (copy, reverse, sort, parity: exact match >= 90 % at n <= 8 with RoPE after 5,000 steps;
# 1,500 steps reached 23 % at n = 8 on reverse, summation stayed at 32 %), training lengths
# n <= 8, tested at every length up to 2x as the paper tests up to 2L (9..12, then 14, 16),
# one seed; RESULTS.md has the sizes tried.
MINI = {
    "tasks": ("copy", "reverse", "sort", "parity"),
    "max_length": 8,
    "eval_lengths": (4, 8, 9, 10, 11, 12, 14, 16),
    "size": "xs",
    "steps": 5000,
    "batch_size": 32,
    "lr": 1e-3,
    "num_examples": 128,
}

# size "" and lr 0 mean "the protocol's" (full or mini); any other value overrides it. seeds
# (the sweep's number of seeds, 0: the protocol's) only shapes get_sweep.
ARGS = {**algorithmic.ARGS, "size": "", "lr": 0.0, "mini": False, "seeds": 0}
sweep_vmap_seeds = "accelerator"  # vmapped seeds gained nothing on the 2-core CPU


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    mini, lr = args.pop("mini"), args.pop("lr")
    del args["seeds"]
    args["size"] = args["size"] or (MINI["size"] if mini else "l")
    protocol_schedule = not args["schedule"] and not mini
    if protocol_schedule:
        args["schedule"] = "cosine"
    config = algorithmic.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    if protocol_schedule:
        config.train.schedule.warmup = 1_000
    config.train.optimizer.lr = lr or (MINI["lr"] if mini else 1e-4)
    config.eval.lengths = "task"
    if mini:
        config_utils.apply_mini(config, MINI)
    elif not args["smoke"]:
        config.train.steps = 40_000
        config.train.batch_size = 64
        config.train.eval_every = 5_000
        config.train.ckpt_every = 5_000
    return config


def get_sweep(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    seeds = range(args["seeds"]) if args["seeds"] else (SEEDS[:1] if args["mini"] else SEEDS)
    return {"task": MINI["tasks"] if args["mini"] else TASKS, "pe": ENCODINGS, "seed": seeds}


CLAIMS_METRIC = "seq_acc"


def get_claims(arg: str | None = None):
    """The paper's findings as checks on compare's rows (./launch.sh reproduce kazemnejad)."""
    paper = "Kazemnejad et al. 2023 (decoder of ~138M parameters, 40k steps)"
    return [
        claims.fits(
            "every encoding fits the training lengths (in-distribution exact match >= 90 %)",
            f"{paper}: all encodings reach near-perfect in-distribution accuracy",
            metric="seq_acc", at_least=0.9,
        ),
        claims.top_by_mrr(
            "NoPE is among the two best encodings by mean reciprocal rank over tasks",
            f"{paper}: ranking NoPE > T5 > ALiBi > RoPE > sinusoidal",
            expected=("none", "t5", "alibi", "rope", "sinusoidal"), k=2,
        ),
        claims.better(
            "NoPE generalises beyond the training length better than sinusoidal",
            f"{paper}: sinusoidal ranks last",
            a={"pe": "none"}, b={"pe": "sinusoidal"}, metric="seq_acc",
        ),
        claims.better(
            "T5's relative bias generalises better than RoPE",
            f"{paper}: T5 ranks second, RoPE fourth",
            a={"pe": "t5"}, b={"pe": "rope"}, metric="seq_acc",
        ),
    ]  # fmt: skip
