"""Formal-language transduction (Deletang et al. 2023, arXiv 2207.02098; randomized positions:
Ruoss et al. 2023, arXiv 2305.16843).

Encoder of 5 layers x d_model 64 x 8 heads (size=s), inputs followed by |y| blanks, outputs
read from the last |y| positions, n ~ U{1..40} one length per batch, batch 128, Adam with
gradient clipping 1.0. Arg keys (ARGS): task (any of the 15 tasks in experiments/tasks/formal.py),
pe, sampler, scorer, model, size, smoke.

  ./launch.sh train --config configs/formal.py:task=reverse_string,pe=alibi --workdir runs/rev_alibi
  ./launch.sh train --config configs/formal.py:task=parity_check,pe=rope,sampler=randomized \
      --workdir runs/parity_rrope --config.train.steps=20000

Expected time, measured on this project's shared 2-core CPU (load average ~14, 08:15 UTC):
size s (0.25M parameters) at batch 128 runs 0.32 steps/s (1,700 tokens/s) after compiling
one train step per length bucket (6 buckets for n <= 40, 20-40 s each under that load), so
the default 10,000 steps take ~9 h there; use size=xs or a GPU for quick studies.

Measured result (same CPU and load; 5.3 min wall, 54 s CPU, ~8 steps/s):

  ./launch.sh train --config configs/formal.py:task=reverse_string,size=xs \
      --config.train.batch_size=32 --config.train.steps=1500 --config.train.optimizer.lr=1e-3 \
      --config.train.eval_every=0 --config.eval.num_examples=128 --workdir runs/rev_xs \
      --lengths 20,40,80

reaches token accuracy 0.60 / 0.58 at n = 20 / 40 (in distribution) and 0.52 at n = 80
(chance 0.5). Expected at the full protocol: the encoder learns reverse_string in
distribution and drops toward chance beyond n = 40 with sinusoidal/none PE; Deletang et al.
report 0.62 (best over seeds and learning rates, 1M steps).
"""

from configs import base
from experiments import config_utils

ARGS = {**base.ARGS, "task": "reverse_string", "model": "encoder", "pe": "sinusoidal"}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    return base.build(**config_utils.parse_arg(arg, ARGS), lr=3e-4, steps=10_000)
