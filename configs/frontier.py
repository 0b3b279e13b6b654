"""The 2024-25 frontier tasks with a causal decoder: arithmetic with operands of independent
lengths, number sorting, passkey and multi-key needle retrieval, the flip-flop language and
the SCAN length split (experiments/tasks/arithmetic.py, retrieval.py, scan.py).

Causal decoder (pre-LN, no dropout), prompt + SEP + answer + EOS with the loss on the answer
(flip_flop: a language model on every token, scored on its reads), exact match (seq_acc) per
length; arithmetic and sorting also on a 2-D grid of lengths (experiments/grid.py, compare
--grid). Arg keys: those of configs/base.py (task, model, pe, sampler, scorer, size, ...),
task defaulting to long_addition. Task formats are task fields:
`--config.task.positions=abacus --config.task.reverse_operands=true`, or the protocol
configs that set them together: configs/abacus.py (McLeish et al. 2024),
configs/position_coupling.py (Cho et al. 2024), configs/index_hints.py (Zhou et al. 2024).

  ./launch.sh train --config configs/frontier.py:task=passkey,pe=rope,size=xs --workdir runs/pk
  ./launch.sh train --config configs/frontier.py:task=scan,model=encoder_decoder --workdir runs/scan
  ./launch.sh train --config configs/frontier.py:task=flip_flop,pe=alibi --workdir runs/ff
  ./launch.sh compare runs/add --out reports/add --grid

Expected: per task its own training range and evaluation grid (each task's DEFAULTS). SCAN's
length split (trained on <= 22 actions, tested on 24-48) is hard: Lake & Baroni's best
sequence-to-sequence RNN reached about 14 % exact match. Passkey and needle retrieval at 4-16x
the training length test whether attention still finds a token far back; flip-flop is learned
in distribution with rare "glitches" on long sparse sequences (Liu et al. 2023). With size s
a run of 10,000 steps takes about as long as configs/algorithmic.py's (hours on 2 CPU cores;
minutes on a GPU); not measured for each task here.
"""

from configs import base
from experiments import claims, config_utils

ARGS = {**base.ARGS, "task": "long_addition", "model": "decoder", "pe": "none"}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    config = base.build(**args, lr=1e-3, steps=10_000)
    if not args["smoke"]:
        config.eval.lengths = "task"
    return config


def arithmetic_claims(
    paper: str, *, ours: tuple[str, dict], baseline: tuple[str, dict], says: tuple
):
    """The three claims of a position scheme for arithmetic (Abacus, coupling) against a baseline,
    on exact match: every row fits the training lengths; ours beats the baseline beyond them;
    ours keeps >= 90 % at twice the training length. `says`: the paper's figures for the
    three, in that order."""
    (name, rows), (base_name, base_rows) = ours, baseline
    return [
        claims.fits(
            "every encoding fits the training lengths (in-distribution exact match >= 90 %)",
            f"{paper}: {says[0]}", metric="seq_acc", at_least=0.9,
        ),
        claims.better(
            f"{name} beats {base_name} beyond the training length (exact match)",
            f"{paper}: {says[1]}", a=rows, b=base_rows, metric="seq_acc",
        ),
        claims.reaches(
            f"{name} keeps >= 90 % exact match at twice the training length",
            f"{paper}: {says[2]}", rows_of=rows, metric="seq_acc", at="2x", at_least=0.9,
        ),
    ]  # fmt: skip
