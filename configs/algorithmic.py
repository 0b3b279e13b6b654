"""Decoder-only prompt + answer tasks (Kazemnejad et al. 2023, arXiv 2305.19466).

Causal decoder (pre-LN, no dropout), seq = input + SEP + answer + EOS, loss on the answer,
right padding; train lengths up to max_length (default 20), evaluated up to 2x and beyond,
exact-match accuracy (seq_acc) per length. Arg keys (ARGS): task (copy, reverse, sort,
addition, summation, parity, polynomial, associative_recall), pe, sampler, scorer, model,
size, smoke. Their headline ranking is NoPE > T5 > ALiBi > RoPE > sinusoidal (138M model).

  ./launch.sh train --config configs/algorithmic.py:task=copy,pe=none --workdir runs/copy_nope
  ./launch.sh train --config configs/algorithmic.py:task=addition,pe=t5,size=m --workdir runs/add_t5

Expected: with size=s, 10,000 steps at batch 128 cost about as much per step as
configs/formal.py size s (hours on 2 CPU cores; a GPU or size=xs for quick studies); copy is
learned in distribution (seq_acc near 1 for n <= 20); out of distribution NoPE and T5 degrade
more slowly than RoPE and sinusoidal. Kazemnejad et al. note that small 3-layer models fail
even in distribution on the harder tasks (addition, polynomial), so use size=m for those.
"""

from configs import base
from experiments import config_utils

ARGS = {**base.ARGS, "task": "copy", "model": "decoder", "pe": "none"}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    return base.build(**config_utils.parse_arg(arg, ARGS), lr=1e-3, steps=10_000)
