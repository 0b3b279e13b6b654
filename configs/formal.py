"""Formal-language transduction (Deletang et al. 2023, arXiv 2207.02098; randomized positions:
Ruoss et al. 2023, arXiv 2305.16843).

Encoder of 5 layers x d_model 64 x 8 heads (size=s), inputs followed by |y| blanks, outputs
read from the last |y| positions, n ~ U{1..40} one length per batch, batch 128, Adam with
gradient clipping 1.0. Arg keys (ARGS): task (any of the 15 tasks in experiments/tasks/formal.py),
pe, sampler, scorer, model, size, smoke.

  ./launch.sh train --config configs/formal.py:task=reverse_string,pe=alibi --workdir runs/rev_alibi
  ./launch.sh train --config configs/formal.py:task=parity_check,pe=rope,sampler=randomized \
      --workdir runs/parity_rrope --config.train.steps=20000

Expected time: size s (0.25M parameters) at batch 128 compiles one train step per length
bucket (at most 7 for n <= 40), then runs the w1 rate of README "Performance"; the default
10,000 steps are a matter of hours on 2 CPU cores, minutes on a GPU. Use size=xs for quick
studies (RESULTS.md has a 1,500-step size-xs run and what it reached).
Expected result at the full protocol: the encoder learns reverse_string in distribution and
drops toward chance beyond n = 40 with sinusoidal/none PE; Deletang et al. report 0.62 (best
over seeds and learning rates, 1M steps).
"""

from configs import base
from experiments import config_utils

ARGS = {**base.ARGS, "task": "reverse_string", "model": "encoder", "pe": "sinusoidal"}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    return base.build(**config_utils.parse_arg(arg, ARGS), lr=3e-4, steps=10_000)
