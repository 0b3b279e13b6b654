"""Reproduction: position coupling (Cho et al. 2024, "Position Coupling: Improving Length
Generalization of Arithmetic Transformers Using Task Structure", NeurIPS 2024, arXiv
2405.20671; reference code HanseulJo/position-coupling, scripts/addition/).

Protocol (paper and reference scripts): addition of operands of 1-30 digits, lengths drawn
independently; both operands zero-padded to the longer one, the answer zero-padded to one
digit more and written least significant digit first ("pad, reversed output"); the digits of
equal significance in both operands and the answer share one position id, '+' and '=' take
the start id s, and s is drawn uniformly per example from [1, max_pos - len(answer)] in
training (1 at evaluation); a learned absolute position embedding (APE) over those ids;
decoder of 1 layer, 4 heads, d_model 1024, feed-forward 2048 (gated GELU), RMSNorm before and
after each sublayer; AdamW lr 1e-4, weight decay 0, batch 1000, 50,000 steps; max_pos 202 for
the test up to 200 digits; 100,000 training examples; test at 5..200 digits (both operands of
that length), exact match. Paper: the 1-layer model trained on 1-30 digits adds 200-digit
numbers (6.67x) with high exact match; NoPE and random-start APE fail beyond the training
lengths.

Ours, recorded: the gated-GELU MLP is our `swiglu` (gated SiLU), normalisation is pre-LN
LayerNorm (no post-norm); examples are drawn fresh every step (not a fixed set of 100k); the
learned table has 1024 rows so that validation's bound on positions (the padded length) holds
at 200 digits, but only rows <= max_pos are ever used: the `offset` sampler keeps every id
below max_len = max_pos + 1 = 203. Baselines of the paper: `emb=nope` (no positions) and
`emb=random_start` (APE over sequential positions with a random start, the reference code's
"vanilla" coupling). The follow-up's multi-level coupling (multi-operand addition,
multiplication; arXiv 2410.15787) is not implemented.

Arg keys: those of configs/frontier.py plus emb (coupled | nope | random_start), mini (bool:
MINI below), seeds (sweep size, 0: the protocol's).

  ./launch.sh train --config configs/position_coupling.py --workdir runs/coupling/one
  ./launch.sh sweep --config configs/position_coupling.py --workdir runs/coupling
  ./launch.sh sweep --config configs/position_coupling.py:mini=true --workdir runs/coupling_mini \
      --parallel 2
  ./launch.sh compare runs/coupling_mini --out reports/coupling_mini --grid

Expected wall time: full, per run about 1-2 GPU-hours on one H100/H200 (50,000 steps of
batch 1000 at ~64 tokens through a 12M-parameter layer; estimated from FLOPs, not measured
here) plus the evaluation up to 200 digits; the sweep is 3 encodings x 3 seeds. Mini:
MINI below (`./launch.sh reproduce position_coupling --mini`); what it measured is in
RESULTS.md.
"""

from attn.registry import require
from configs import frontier
from experiments import config_utils

EMBEDDINGS = ("coupled", "nope", "random_start")
SEEDS = (0, 1, 2)
MAX_POS = 202
EVAL_LENGTHS = (10, 20, 30, 40, 50, 75, 100, 150, 200)
GRID_LENGTHS = (1, 10, 20, 30, 40, 50, 75, 100, 150, 200)

# The reduced protocol, minutes per run on 2 shared CPU cores: operands of 1-8 digits tested
# to 24 (3x; the paper 6.67x), the paper's 1-layer 4-head decoder at width 128, 3,000 steps of
# batch 64, max_pos 32; coupled positions against NoPE, one seed; a 6 x 6 grid. Sized so that
# coupling fits the training lengths, not tuned on 9-24.
MINI = {
    "emb": ("coupled", "nope"),
    "max_length": 8,
    "eval_lengths": (4, 8, 12, 16, 20, 24),
    "grid_lengths": (1, 4, 8, 12, 16, 24),
    "d_model": 128,
    "mlp_dim": 512,
    "steps": 3000,
    "batch_size": 64,
    "lr": 1e-3,
    "max_pos": 32,
    "num_examples": 128,
}

ARGS = {**frontier.ARGS, "size": "", "emb": "coupled", "mini": False, "seeds": 0}
SMOKE_ARGS = "smoke=true"
sweep_vmap_seeds = "accelerator"


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    emb, mini = args.pop("emb"), args.pop("mini")
    del args["seeds"]
    require(emb in EMBEDDINGS, "config arg emb", f"{emb!r}; one of {', '.join(EMBEDDINGS)}")
    args["task"] = "long_addition"
    args["size"] = args["size"] or "s"
    args["pe"] = "none" if emb == "nope" else "learned"
    args["sampler"] = "" if emb == "nope" else "offset"
    full = not (mini or args["smoke"])
    if full:
        args["optimizer"] = args["optimizer"] or "adamw"
    config = frontier.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    config.variant = f"decoder:{emb}"
    t, m, tr = config.task, config.model, config.train
    t.pad, t.reverse_answer, t.reverse_operands = True, True, False
    t.positions = "coupled" if emb == "coupled" else "none"
    t.train_lengths, t.min_length = "fixed", 1
    m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 1, 4, 0, 0
    m.mlp, m.norm, m.dropout = "swiglu", "pre", 0.0
    max_pos = MINI["max_pos"] if mini else MAX_POS
    if emb != "nope":
        m.pe.max_len = 1024
        m.positions.per_sequence = True  # one start per example, as the reference code
        m.positions.max_offset = -1  # bounded by the table alone: s in [1, max_pos - len]
        # random_start: sequential ids must fit the table at the longest evaluation
        m.positions.max_len = max_pos + 1 if emb == "coupled" else 1024
    if args["smoke"]:
        return config
    if mini:
        t.max_length = MINI["max_length"]
        t.eval_lengths, t.grid_lengths = MINI["eval_lengths"], MINI["grid_lengths"]
        m.d_model, m.mlp_dim = MINI["d_model"], MINI["mlp_dim"]
        if emb != "nope":
            m.pe.max_len = 128
            if emb == "random_start":
                m.positions.max_len = 128
        tr.steps, tr.batch_size, tr.optimizer.lr = MINI["steps"], MINI["batch_size"], MINI["lr"]
        tr.log_every, tr.eval_every, tr.ckpt_every = 100, 0, 1000
        config.eval.num_examples = MINI["num_examples"]
        return config
    t.max_length = 30
    t.eval_lengths, t.grid_lengths = EVAL_LENGTHS, GRID_LENGTHS
    m.d_model, m.mlp_dim = 1024, 2048
    tr.optimizer.lr = 1e-4
    if "weight_decay" in tr.optimizer:
        tr.optimizer.weight_decay = 0.0
    tr.steps, tr.batch_size = 50_000, 1000
    tr.eval_every, tr.ckpt_every = 10_000, 5_000
    config.eval.num_examples, config.eval.batch_size = 1000, 100
    return config


def get_sweep(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    if args["mini"]:
        return {"emb": MINI["emb"], "seed": range(args["seeds"] or 1)}
    return {"emb": EMBEDDINGS, "seed": range(args["seeds"]) if args["seeds"] else SEEDS}


CLAIMS_METRIC = "seq_acc"
CLAIMS_GRID = True


def get_claims(arg: str | None = None):
    """The paper's findings as checks on compare's rows (./launch.sh reproduce
    position_coupling)."""
    return frontier.arithmetic_claims(
        "Cho et al. 2024 (1-layer 4-head decoder, trained on 1-30 digits)",
        ours=("coupling", {"pe": "learned", "task.positions": "coupled"}),
        baseline=("NoPE", {"pe": "none"}),
        says=(
            "NoPE and coupling both train to near-perfect in-distribution accuracy",
            "coupling adds 200-digit numbers; NoPE fails beyond the trained lengths",
            "> 95 % exact match up to 200 digits (6.67x)",
        ),
    )
