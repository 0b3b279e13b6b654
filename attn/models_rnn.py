"""Recurrent encoder-decoder baselines (seq2seq layout), registered in attn.models.

- `rnn_seq2seq`: Sutskever et al. 2014, "Sequence to Sequence Learning with Neural Networks":
  an LSTM (Hochreiter & Schmidhuber 1997; GRU, Cho et al. 2014, as an option) encoder whose
  final state is the decoder's initial state, and nothing else passes between them.
- `rnn_attention`: Bahdanau et al. 2015, "Neural Machine Translation by Jointly Learning to
  Align and Translate": the same, but at every step the decoder attends over all encoder
  states with the previous decoder state as the query (additive scoring by default; Luong et
  al. 2015 "luong" scoring via attn.scoring), and the context is fed to the cell and to the
  output layer.

Both are trained with teacher forcing on `batch["inputs"]` and padded sources are handled with
`src_mask` (the encoder's carry stops at each example's last real token). The time loops are
plain `lax.scan`s over the cells, so a forward pass mutates no RNG state.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import attn.scoring
from attn import layers
from attn.registry import lookup, require

CELLS = {"lstm": nnx.LSTMCell, "gru": nnx.GRUCell}

RNN_DEFAULTS = {
    "num_layers": 1,
    "d_model": 64,
    "rnn": {"cell": "lstm", "hidden": 128},
    "dropout": 0.0,
    "dropout_rng": "hash",  # dropout masks: "hash" (fast) or "threefry" (nnx.Dropout)
    "tied_embeddings": False,
    "embed_scale": False,
    # Unit-variance embeddings (as torch.nn.Embedding, flax Embed): with 0.02 the LSTM's
    # input gradients are ~1e-6 and copy does not train in hundreds of steps.
    "init_std": 1.0,
    "dtype": "float32",
}


def make_cell(cfg, in_features: int, rngs):
    cell_cls = lookup(CELLS, cfg["rnn"]["cell"], "model.rnn.cell")
    return cell_cls(
        in_features,
        cfg["rnn"]["hidden"],
        rngs=rngs,
        kernel_metadata={"out_sharding": ("embed", "state"), "eager_sharding": False},
        recurrent_kernel_metadata={"out_sharding": (None, "state"), "eager_sharding": False},
        bias_metadata={"out_sharding": ("state",), "eager_sharding": False},
    )


def _zero_carry(cell, batch_size: int):
    """The cell's carry structure (LSTM: (c, h); GRU: h), all zeros."""
    shape = jax.eval_shape(
        lambda: cell.initialize_carry((batch_size, cell.in_features), rngs=nnx.Rngs(0))
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)


def _stack_step(cells, carries, x_t):
    """One time step through stacked cells; returns (new carries, top output)."""
    new = []
    for cell, c in zip(cells, carries, strict=True):
        c, x_t = cell(c, x_t)
        new.append(c)
    return new, x_t


def validate_rnn(cfg, *, max_length=None) -> None:
    lookup(CELLS, cfg["rnn"]["cell"], "model.rnn.cell")
    lookup(layers.DTYPES, cfg["dtype"], "model.dtype")
    require(cfg["num_layers"] >= 1, "model.num_layers", f"must be >= 1, got {cfg['num_layers']}")
    require(cfg["rnn"]["hidden"] >= 1, "model.rnn.hidden", "must be >= 1")
    layers.check_dropout(cfg)


class RNNSeq2Seq(nnx.Module):
    """Recurrent encoder-decoder passing only the encoder's final state."""

    FORMAT = "seq2seq"
    DEFAULTS = RNN_DEFAULTS
    validate_config = staticmethod(validate_rnn)

    @classmethod
    def layout(cls, cfg=None) -> str:
        return cls.FORMAT

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
        cfg = layers.resolve(type(self), cfg)
        validate_rnn(cfg)
        self.cfg = cfg
        d, hidden = cfg["d_model"], cfg["rnn"]["hidden"]
        self.embedder = layers.Embedder(cfg, vocab_size=vocab_size, rngs=rngs)
        self.dropout = layers.Dropout(cfg["dropout"], rng=cfg["dropout_rng"], rngs=rngs)
        self.encoder_cells = nnx.List(
            [make_cell(cfg, d if i == 0 else hidden, rngs) for i in range(cfg["num_layers"])]
        )
        self.decoder_cells = nnx.List(
            [
                make_cell(cfg, self._decoder_in(d) if i == 0 else hidden, rngs)
                for i in range(cfg["num_layers"])
            ]
        )
        self.out = layers.Dense(
            (self._out_in(hidden),), (d,), ("state", "embed"), rngs=rngs, use_bias=True
        )

    def _decoder_in(self, d):
        return d

    def _out_in(self, hidden):
        return hidden

    def encode(self, src, src_mask, *, train):
        """Encoder states BSF and the per-layer carries at each example's last real token."""
        x = self.dropout(self.embedder.embed(src), deterministic=not train)
        carries = [_zero_carry(cell, x.shape[0]) for cell in self.encoder_cells]

        def step(carries, inputs):
            x_t, valid_t = inputs
            new, y = _stack_step(self.encoder_cells, carries, x_t)
            # Padding leaves the carry as it was, so the final carry is the last real one.
            keep = lambda n, o: jnp.where(valid_t[:, None], n, o)
            return jax.tree.map(keep, new, carries), y

        carries, ys = jax.lax.scan(step, carries, (jnp.swapaxes(x, 0, 1), src_mask.T))
        return jnp.swapaxes(ys, 0, 1), carries

    def _decode_steps(self, x_BTD, carries, memory, src_mask):
        """Teacher-forced decoder over time; returns (outputs BTF, attention B1TS or None)."""
        del memory, src_mask
        step = lambda carries, x_t: _stack_step(self.decoder_cells, carries, x_t)
        _, ys = jax.lax.scan(step, carries, jnp.swapaxes(x_BTD, 0, 1))
        return jnp.swapaxes(ys, 0, 1), None

    def __call__(self, batch, *, train: bool, return_attention=()):
        src = batch["src"]
        src_mask = batch.get("src_mask")
        src_mask = jnp.ones(src.shape, bool) if src_mask is None else src_mask.astype(bool)
        memory, carries = self.encode(src, src_mask, train=train)
        x = self.dropout(self.embedder.embed(batch["inputs"]), deterministic=not train)
        ys, weights = self._decode_steps(x, carries, memory, src_mask)
        h = jnp.tanh(self.out(self.dropout(ys, deterministic=not train)))
        logits = self.embedder.logits(h)
        if not return_attention:
            return logits
        require(
            weights is not None,
            "return_attention",
            f"{type(self).__name__} has no attention; use rnn_attention",
        )
        return logits, {i: weights for i in return_attention if i == 0}


class RNNAttention(RNNSeq2Seq):
    """Recurrent encoder-decoder whose decoder attends over all encoder states (Bahdanau)."""

    DEFAULTS = {**RNN_DEFAULTS, "scorer": {"name": "additive"}}

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
        super().__init__(cfg, vocab_size=vocab_size, rngs=rngs)
        self.scorer = attn.scoring.build(
            self.cfg["scorer"], num_heads=1, head_dim=self.cfg["rnn"]["hidden"], rngs=rngs
        )

    def _decoder_in(self, d):
        return d + self.cfg["rnn"]["hidden"]

    def _out_in(self, hidden):
        return 2 * hidden

    def _decode_steps(self, x_BTD, carries, memory, src_mask):
        k = memory[:, :, None, :]
        mask = src_mask[:, None, None, :]

        def top_hidden(c):
            return c[-1][1] if isinstance(c[-1], tuple) else c[-1]

        def step(carries, x_t):
            query = top_hidden(carries)[:, None, None, :]
            ctx, w = self.scorer(query, k, k, mask=mask, impl="reference", return_weights=True)
            ctx = ctx[:, 0, 0]
            new, y = _stack_step(self.decoder_cells, carries, jnp.concatenate([x_t, ctx], -1))
            return new, (jnp.concatenate([y, ctx], axis=-1), w[:, :, 0])

        _, (ys, w_TBHS) = jax.lax.scan(step, carries, jnp.swapaxes(x_BTD, 0, 1))
        return jnp.swapaxes(ys, 0, 1), jnp.transpose(w_TBHS, (1, 2, 0, 3))
