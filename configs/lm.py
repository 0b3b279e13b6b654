"""Byte-level language modelling, train short / test long (Press et al. 2022, ALiBi,
arXiv 2108.12409).

Causal decoder trained on windows of task.max_length bytes (default 512) of a text corpus
(by default this Python's standard library sources, TFDS `attn_text`), evaluated by
perplexity on non-overlapping chunks of 1x..16x the training length. Arg keys (ARGS): pe,
sampler, scorer, size, smoke (task is fixed to "text"; the corpus is
--config.task.source=/path --config.task.pattern='*.txt').

  ./launch.sh train --config configs/lm.py:pe=alibi --workdir runs/lm_alibi
  ./launch.sh train --config configs/lm.py:pe=rope,size=m --workdir runs/lm_rope

Expected: ALiBi's perplexity stays flat (or improves) past 512 tokens; sinusoidal explodes
beyond the training length; RoPE and T5 degrade in between (Press et al. Fig. 1). Size s on
512-token windows costs ~10x a formal step (estimate, not measured): hours for 2,000 steps on
the shared 2-core CPU; use a GPU for real runs.
"""

from configs import base
from experiments import config_utils

ARGS = {**{k: v for k, v in base.ARGS.items() if k != "task"}, "model": "decoder", "pe": "alibi"}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    args = config_utils.parse_arg(arg, ARGS)
    args["schedule"] = args["schedule"] or "cosine"
    return base.build(task="text", **args, lr=1e-3, batch_size=32, steps=20_000)
