"""Reproduction: Abacus embeddings (McLeish et al. 2024, "Transformers Can Do Arithmetic with
the Right Embeddings", NeurIPS 2024, arXiv 2405.17399; reference code mcleish7/arithmetic).

Protocol (paper and reference shells): addition of operands of 1-20 digits each, lengths
drawn independently ("bucket" data, n = m = 20), every number written least significant
digit first ("reverse all"), no padding, loss on the answer only; a decoder whose digits get
Abacus embeddings: a learned table E indexed by each digit's place inside its own number
(1 for the least significant), plus one random offset k ~ U{0..99} per training batch
(`max_k` 99 in the reference code; here the `offset` sampler over the task's position ids),
no positional encoding in attention (NoPE). Models: the looped transformer with input
injection (the reference shells' 1-layer block applied 16 times, hidden 1024, MLP 2048) and
a standard 16-layer decoder; lr 1e-4, batch 512, one GPU for 24 hours. Evaluation: 100
examples per cell of a 100 x 100 grid of operand lengths (exact match), reported for
in-distribution (both <= 20) and out-of-distribution cells. Paper: up to 99% exact match on
100-digit addition (6x the training length); Abacus beats FIRE and NoPE; input injection and
looping help further. Multiplication (operands up to 15 digits, tested to 25) and sorting
(up to 10 numbers of up to 10 digits, tested to 30 x 30) are `op=mul` and `op=sort`.

Ours, recorded: AdamW with 1,000 warmup steps and cosine decay over 50,000 steps instead of
the cramming framework's time budget; examples drawn fresh every step instead of a fixed set
of 20M; the looped model's steps are fixed at 16 (`loop.steps`), pre-LN, GELU MLP; Abacus +
FIRE (a second, sequential position stream for FIRE) is not expressible here: the batch
carries one stream of position ids (README "Interfaces"), so `emb=fire` is FIRE alone.

Arg keys: those of configs/frontier.py plus emb (abacus | nope | fire), arch (looped |
standard), op (add | mul | sort), mini (bool: MINI below), seeds (sweep size, 0: protocol's).

  # one run of the full protocol (an accelerator job)
  ./launch.sh train --config configs/abacus.py --workdir runs/abacus/one
  # the comparison: Abacus vs NoPE vs FIRE, looped vs standard, 3 seeds
  ./launch.sh sweep --config configs/abacus.py --workdir runs/abacus
  # CPU mini (MINI below) and its grid table and heatmap
  ./launch.sh sweep --config configs/abacus.py:mini=true --workdir runs/abacus_mini --parallel 2
  ./launch.sh compare runs/abacus_mini --out reports/abacus_mini --grid

Expected wall time: full, per run about 2-4 GPU-hours on one H100/H200 in bfloat16 for
50,000 steps of batch 512 at 64 tokens (estimated from the looped model's ~135M effective
parameters per token, not measured here), plus the 12 x 12 grid; the sweep is 18 runs.
Mini: MINI below (`./launch.sh reproduce abacus --mini`); what it measured is in RESULTS.md.
"""

from attn.registry import require
from configs import frontier
from experiments import config_utils

EMBEDDINGS = ("abacus", "nope", "fire")
ARCHS = ("looped", "standard")
SEEDS = (0, 1, 2)
OPS = {
    # task, training digits, evaluation lengths, grid lengths
    "add": ("long_addition", 20, (10, 20, 30, 40, 60, 80, 100, 120), None),
    "mul": ("long_multiplication", 15, (5, 10, 15, 20, 25), None),
    "sort": ("number_sort", 10, (5, 10, 15, 20, 30), None),
}

# The reduced protocol, minutes per run on 2 CPU cores: operands of 1-6 digits,
# tested to 16 (2.7x; the paper 5-6x), a looped 1-layer block of width 128 applied twice,
# 3,000 steps of batch 64; Abacus (k ~ U{0..10}) against NoPE, one seed; a 6 x 6 grid of
# 100 examples a cell. Sized by in-distribution fit (sizes tried: RESULTS.md), not tuned on
# lengths 7-16.
MINI = {
    "emb": ("abacus", "nope"),
    "max_length": 6,
    "eval_lengths": (3, 6, 8, 10, 12, 16),
    "grid_lengths": (1, 3, 6, 8, 12, 16),
    "d_model": 128,
    "num_heads": 4,
    "mlp_dim": 512,
    "loop_steps": 2,
    "steps": 3000,
    "batch_size": 64,
    "lr": 1e-3,
    "max_offset": 10,
    "num_examples": 128,
}

ARGS = {
    **frontier.ARGS,
    "size": "",
    "emb": "abacus",
    "arch": "looped",
    "op": "add",
    "mini": False,
    "seeds": 0,
}
SMOKE_ARGS = "smoke=true"
sweep_vmap_seeds = "accelerator"


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    emb, arch, op, mini = args.pop("emb"), args.pop("arch"), args.pop("op"), args.pop("mini")
    del args["seeds"]
    for key, value, allowed in (("emb", emb, EMBEDDINGS), ("arch", arch, ARCHS), ("op", op, OPS)):
        require(value in allowed, f"config arg {key}", f"{value!r}; one of {', '.join(allowed)}")
    task, train_digits, eval_lengths, _ = OPS[op]
    args["task"] = task
    args["model"] = "looped" if arch == "looped" else "decoder"
    args["pe"] = {"abacus": "learned", "nope": "none", "fire": "fire"}[emb]
    args["sampler"] = "offset" if emb == "abacus" else ""
    args["size"] = args["size"] or "s"
    full = not (mini or args["smoke"])
    if full:
        args["optimizer"], args["schedule"] = (
            args["optimizer"] or "adamw",
            args["schedule"] or "cosine",
        )
    config = frontier.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    t, m, tr = config.task, config.model, config.train
    config.variant = f"{args['model']}:{emb}"
    t.reverse_operands = True
    if op != "sort":
        t.reverse_answer = True
        t.pad = False
    t.positions = "abacus" if emb == "abacus" else "none"
    t.train_lengths, t.min_length = "fixed", 1
    if emb == "abacus":
        m.pe.max_len = 1024  # the reference code's table (max_seq_length)
        m.positions.max_offset = 99
        m.positions.per_sequence = False  # one k per batch, as the reference code
    m.norm, m.mlp, m.dropout = "pre", "gelu", 0.0
    if args["smoke"]:
        return config
    tr.optimizer.lr = 1e-4
    if mini:
        t.max_length = MINI["max_length"]
        t.eval_lengths = MINI["eval_lengths"]
        t.grid_lengths = MINI["grid_lengths"]
        m.d_model, m.num_heads, m.num_kv_heads = MINI["d_model"], MINI["num_heads"], 0
        m.mlp_dim = MINI["mlp_dim"]
        m.num_layers = 1 if arch == "looped" else MINI["loop_steps"]
        if arch == "looped":
            m.loop.steps = MINI["loop_steps"]
        if emb == "abacus":
            m.positions.max_offset = MINI["max_offset"]
            m.pe.max_len = 128
        tr.steps, tr.batch_size, tr.optimizer.lr = MINI["steps"], MINI["batch_size"], MINI["lr"]
        tr.log_every, tr.eval_every, tr.ckpt_every = 100, 0, 1000
        config.eval.num_examples = MINI["num_examples"]
        config.eval.lengths = "task"
        return config
    t.max_length = train_digits
    t.eval_lengths = eval_lengths
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 1024, 16, 0, 2048
    if arch == "looped":
        m.num_layers, m.loop.steps = 1, 16
    else:
        m.num_layers = 16
    tr.steps, tr.batch_size = 50_000, 512
    if "warmup" in tr.schedule:
        tr.schedule.warmup = 1_000
    tr.eval_every, tr.ckpt_every = 10_000, 5_000
    config.eval.num_examples, config.eval.batch_size = 100, 100
    return config


def get_sweep(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    if args["mini"]:
        return {"emb": MINI["emb"], "seed": range(args["seeds"] or 1)}
    return {
        "emb": EMBEDDINGS,
        "arch": ARCHS,
        "seed": range(args["seeds"]) if args["seeds"] else SEEDS,
    }


CLAIMS_METRIC = "seq_acc"
CLAIMS_GRID = True


def get_claims(arg: str | None = None):
    """The paper's findings as checks on compare's rows (./launch.sh reproduce abacus)."""
    return frontier.arithmetic_claims(
        "McLeish et al. 2024 (looped 1 x 16, trained on <= 20 digits)",
        ours=("Abacus", {"pe": "learned", "sampler": "offset"}),
        baseline=("NoPE", {"pe": "none"}),
        says=(
            "in-distribution cells of the heatmaps near 100 % for every embedding",
            "Abacus up to 99 % at 100 digits, NoPE and FIRE far lower",
            "up to 99 % at 6x (100 digits)",
        ),
    )
