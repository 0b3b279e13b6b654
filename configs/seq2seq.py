"""Sequence-to-sequence and recurrent baselines on the formal tasks.

Models: encoder_decoder (Vaswani et al. 2017, teacher forcing, no PE in cross attention as in
T5), rnn_seq2seq (Sutskever et al. 2014), rnn_attention (Bahdanau et al. 2015, additive
scorer by default; Luong et al. 2015 with scorer=luong), ssm (a diagonal state-space
baseline). Deletang et al. 2023 found recurrent models (LSTM) generalise in length on many
tasks where Transformers fail. Arg keys (ARGS): task, model, pe, sampler, scorer, size, smoke.

  ./launch.sh train --config configs/seq2seq.py:model=rnn_attention,task=reverse_string \
      --workdir runs/rev_lstm_attn
  ./launch.sh train --config configs/seq2seq.py:model=encoder_decoder,pe=rope --workdir runs/rev_ed

Expected: on reverse_string the LSTM with attention generalises further out of distribution
than the encoder-only Transformer of configs/formal.py; 10,000 steps at batch 128 cost
about as much per step as configs/formal.py size s (not measured separately; hours on the
shared 2-core CPU).
"""

from configs import base
from experiments import config_utils

ARGS = {**base.ARGS, "task": "reverse_string", "model": "encoder_decoder", "pe": ""}
SMOKE_ARGS = "smoke=true"


def get_config(arg: str | None = None):
    return base.build(**config_utils.parse_arg(arg, ARGS), lr=1e-3, steps=10_000)
