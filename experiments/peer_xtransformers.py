"""The x-transformers side of `bench --vs x-transformers` (experiments/bench_peer.py).

Runs under the peer's own virtual environment (.peer/x-transformers: CPU torch and
x-transformers, https://github.com/lucidrains/x-transformers) and imports neither jax nor
the project. One JSON object per line on stdin, one answer line on stdout each:

    {"cmd": "info"} -> {"ok": true, "torch": v, "x_transformers": v, "threads": n, "cxx": path}
    {"cmd": "build", "mode": "eager"|"compile", "model": {...}, "encoding": e, "batch": B,
     "lr": lr, "clip": c, "threads": n, "seed": s, "dynamic": bool}
        -> {"ok": true, "params": n}            (replaces that mode's model)
    {"cmd": "steps", "mode": m, "lengths": [T, ...]}
        -> {"ok": true, "seconds": s, "loss": x, "graphs": n}   (one training step per length)
    {"cmd": "quit"}

A failure is {"ok": false, "error": "..."}; the process keeps serving. "model" holds
num_layers, d_model, num_heads, mlp_dim, vocab, causal, norm ("pre" | "post") and max_len.
A step is forward, cross-entropy over every position, backward, gradient clipping and Adam
(fused where torch has it); "compile" wraps forward + loss in torch.compile (inductor),
`dynamic=True` when the caller runs several lengths (one graph for all of them) and static
shapes otherwise. Batches are random token ids, one per length, made once (not timed).
"""

import json
import os
import shutil
import sys
import time

# Run as a script, this file's folder (experiments/) would come first on sys.path and its
# modules would shadow the standard library's (profile.py): keep the folder off it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import x_transformers  # noqa: E402
from torch import nn  # noqa: E402

# attn's encoding name -> (AttentionLayers keywords, TransformerWrapper keywords). The
# keyword names are those of x_transformers/x_transformers.py 2.31.10.
ENCODINGS = {
    "none": ({}, {"use_abs_pos_emb": False}),
    "sinusoidal": ({}, {"use_abs_pos_emb": True, "scaled_sinu_pos_emb": True}),
    "learned": ({}, {"use_abs_pos_emb": True}),
    "rope": ({"rotary_pos_emb": True}, {"use_abs_pos_emb": False}),
    "alibi": ({"alibi_pos_bias": True}, {"use_abs_pos_emb": False}),
    "t5": ({"rel_pos_bias": True}, {"use_abs_pos_emb": False}),
}
NO_FLASH = ("t5",)  # x-transformers asserts flash attention is off with the T5 bias


def build_model(model: dict, encoding: str) -> nn.Module:
    """The x-transformers model closest to attn's: no biases in attention and MLP, ReLU MLP
    of mlp_dim, post- or pre-LN, RoPE over the full head dimension (attn's default)."""
    layers_kw, wrapper_kw = ENCODINGS[encoding]
    D, H = model["d_model"], model["num_heads"]
    K = D // H
    if encoding == "rope":
        layers_kw = {**layers_kw, "rotary_emb_dim": K}
    layers = (x_transformers.Decoder if model["causal"] else x_transformers.Encoder)(
        dim=D,
        depth=model["num_layers"],
        heads=H,
        attn_dim_head=K,
        attn_flash=encoding not in NO_FLASH,
        ff_mult=model["mlp_dim"] / D,
        ff_custom_activation=nn.ReLU(),
        ff_no_bias=True,
        pre_norm=model["norm"] == "pre",
        verbose=False,
        **layers_kw,
    )
    return x_transformers.TransformerWrapper(
        num_tokens=model["vocab"], max_seq_len=model["max_len"], attn_layers=layers, **wrapper_kw
    )


def _graphs() -> int:
    """Graphs torch.compile made since the last compiled model was built."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class Trainer:
    def __init__(self, spec: dict):
        torch.manual_seed(spec.get("seed", 0))
        self.model = build_model(spec["model"], spec["encoding"])
        self.vocab = spec["model"]["vocab"]
        self.batch = spec["batch"]
        self.clip = spec["clip"]
        try:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=spec["lr"], fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(self.model.parameters(), lr=spec["lr"])
        # bfloat16: torch's CPU autocast (matmuls and attention in bf16, parameters, Adam and
        # the loss's softmax in float32), the counterpart of attn's model.dtype=bfloat16.
        self.dtype = spec.get("dtype", "float32")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: {self.dtype!r}; allowed: float32, bfloat16")
        self.loss_fn = self._loss
        if spec["mode"] == "compile":
            # Every model's loss is the same code object: without a reset, the graphs of
            # earlier models would count against dynamo's recompile limit (then: eager).
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            self.loss_fn = torch.compile(self._loss, dynamic=bool(spec.get("dynamic")))
        self.batches: dict[int, tuple] = {}
        self.params = sum(p.numel() for p in self.model.parameters())

    def _loss(self, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), y.reshape(-1))

    def _data(self, T: int):
        if T not in self.batches:
            g = torch.Generator().manual_seed(T)
            x = torch.randint(0, self.vocab, (self.batch, T), generator=g)
            y = torch.randint(0, self.vocab, (self.batch, T), generator=g)
            self.batches[T] = (x, y)
        return self.batches[T]

    def steps(self, lengths) -> dict:
        data = [self._data(int(T)) for T in lengths]
        t0 = time.perf_counter()
        for x, y in data:
            loss = self.loss_fn(x, y)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        return {"seconds": time.perf_counter() - t0, "loss": value, "graphs": _graphs()}


def handle(msg: dict, trainers: dict) -> dict:
    cmd = msg.get("cmd")
    if cmd == "info":
        return {
            "torch": torch.__version__,
            "x_transformers": _version("x-transformers"),
            "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
            "cxx": shutil.which(os.environ.get("CXX", "g++")),
        }
    if cmd == "build":
        torch.set_num_threads(int(msg["threads"]))
        trainers[msg["mode"]] = trainer = Trainer(msg)
        return {"params": trainer.params}
    if cmd == "steps":
        if msg.get("mode") not in trainers:
            raise ValueError(f"steps: no model built for mode {msg.get('mode')!r}")
        return trainers[msg["mode"]].steps(msg["lengths"])
    raise ValueError(f"unknown cmd {cmd!r}; cmds: info, build, steps, quit")


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def serve(inp, out) -> None:
    trainers: dict = {}
    for line in inp:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            if msg.get("cmd") == "quit":
                return
            answer = {"ok": True, **handle(msg, trainers)}
        except Exception as e:  # noqa: BLE001 - every failure goes back as one line
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    # The protocol owns the original stdout; anything else writing to fd 1 (warnings printed
    # by libraries, compiler output) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, out)


if __name__ == "__main__":
    main()
