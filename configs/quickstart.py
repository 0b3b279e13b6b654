"""Quickstart ablation: six positional encodings on one task, small enough for a laptop.

What `./launch.sh` (no arguments; experiments/quickstart.py) runs through experiments.sweep and
experiments.compare: the encoder protocol of Deletang et al. 2023 (arXiv 2207.02098; built on
configs/formal.py) shrunk to minutes. Task bucket_sort (sort a string over a 5-symbol
alphabet; outputs read at the |y| blank positions after the input), training lengths n ~
U{1..8} one length per batch, a 2-layer encoder of width 32 (size xs), batch 32, Adam at 1e-3
for 1,500 steps, evaluated at lengths 4 and 8 (in distribution) and 16 and 32 (2x and 4x
beyond). Encodings: none, sinusoidal, learned, t5 (relative bias), alibi, rope; one seed.

  ./launch.sh                                    # sweep + compare, prints where the files are
  ./launch.sh sweep --config configs/quickstart.py --workdir runs/quickstart --parallel 2
  ./launch.sh compare runs/quickstart --out reports/quickstart
  ./launch.sh train --config configs/quickstart.py:pe=alibi --workdir runs/qs_alibi   # one run

Expected wall time: a few minutes on 2 CPU cores with two runs at once (RESULTS.md has the
measured time). Expected result: every encoding but none fits the training lengths; none
cannot tell the output slots of an encoder apart and stays low; beyond n = 8 accuracy drops
for all of them (RESULTS.md has the measured table).
"""

from configs import formal
from experiments import config_utils

ENCODINGS = ("none", "sinusoidal", "learned", "t5", "alibi", "rope")
ARGS = {**formal.ARGS, "task": "bucket_sort", "pe": "rope", "size": "xs"}


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    config = formal.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    config.task.min_length = 1
    config.task.max_length = 8
    config.train.steps = 1500
    config.train.batch_size = 32
    config.train.optimizer.lr = 1e-3
    config.train.log_every = 100
    config.train.eval_every = 0
    config.train.ckpt_every = 500
    config.eval.lengths = "4,8,16,32"
    config.eval.num_examples = 128
    return config


def get_sweep(arg: str | None = None):
    return {"pe": ENCODINGS, "seed": [0]}
