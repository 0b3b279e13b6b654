"""Where training time goes: model FLOPs utilisation (MFU) in the logs and profiler traces.

- MFU: model FLOPs per step / step time / (peak FLOP/s of one device x devices). Model FLOPs
  follow the PaLM convention (Chowdhery et al. 2022, appendix B), as experiments/bench.py:
  6 N + 12 n_layers d_attn T per token for a training step (N: matmul parameters with the
  output head, embedding lookups excluded; T: the padded length, full T x T attention
  counted even when causal), padded tokens included since they are computed. The peak is
  `train.peak_tflops` when set, else the table `PEAKS` of known accelerators (dense
  bfloat16, and the TF32 rate for float32 on GPUs, which XLA uses for float32 matmuls by
  default on Ampere and newer; TPUs run float32 matmuls as bfloat16 passes by default, so
  their one peak serves both). On a CPU no peak is assumed: how many cores a run gets and
  what else runs on them change it from run to run, so MFU is left out of the rows unless
  `train.peak_tflops` is given (`./launch.sh bench` measures the matmul peak: its `peak`
  line, in GFLOP/s). Models other than the single-stack Transformers (encoder, decoder) have
  no FLOP formula here and log no MFU.
- Traces: `train.profile_steps = "a,b"` records a `jax.profiler` trace of steps a .. b-1
  (the trace starts before step a is dispatched and stops once step b-1's metrics are on the
  host) into `workdir/profile`, which TensorBoard's profile plugin reads
  (`tensorboard --logdir <workdir>/profile`, with tensorboard-plugin-profile installed).

`StepStats(config, workdir)` holds both for one run; the driver (experiments/train.py) wraps
its batch placement with `place`, asks `mfu` when it writes a row, and calls `step_started` /
`metrics_seen` around the loop's steps.
"""

import logging
import os

import jax
import numpy as np

import attn.models
from attn import layers
from attn.registry import ConfigError

log = logging.getLogger("attn.profile")

# (substring of jax's device_kind, dense bfloat16 TFLOP/s, float32 TFLOP/s) per device (one
# GPU; one TPU chip, or one TensorCore where JAX shows each core as a device: v2, v3).
# Vendor data sheets; the first match wins, so more specific names come first.
PEAKS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H200", 989.4, 494.7),
    ("GH200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
    ("TPU v6 lite", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
    ("TPU v3", 61.5, 61.5),
    ("TPU v2", 22.5, 22.5),
)
SINGLE_STACK = ("encoder", "decoder")


def device_peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Peak TFLOP/s of one device of this kind for model.dtype, or None if not in PEAKS."""
    for pattern, bf16, f32 in PEAKS:
        if pattern.lower() in device_kind.lower():
            return f32 if dtype == "float32" else bf16
    return None


def flops_per_step(model_cfg, *, vocab: int, batch: int, length: int) -> float:
    """PaLM model FLOPs of one training step of a single-stack Transformer block."""
    cfg = layers.resolve(attn.models.REGISTRY[model_cfg["name"]], model_cfg)
    L, D, H = cfg["num_layers"], cfg["d_model"], cfg["num_heads"]
    G = cfg["num_kv_heads"] or H
    K = cfg["head_dim"] or D // H
    mlp_mats = 3 if cfg["mlp"] == "swiglu" else 2
    per_layer = D * H * K + 2 * D * G * K + H * K * D + mlp_mats * D * cfg["mlp_dim"]
    params = L * per_layer + D * vocab
    return 3 * (2 * params + 4 * L * H * K * length) * batch * length


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """ "a,b" -> (a, b) with 0 <= a < b; "" -> None; ConfigError otherwise."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in str(spec).split(","))
    except ValueError:
        a, b = -1, -1
    if not 0 <= a < b:
        raise ConfigError(
            f"train.profile_steps: {spec!r}; 'a,b' with 0 <= a < b traces steps a..b-1, "
            "e.g. '10,15'; '' for none"
        )
    return a, b


class StepStats:
    """MFU of the rows one run logs and its profiler trace window (module docstring)."""

    def __init__(self, config, workdir: str, *, vocab: int):
        t = config.train
        self.window = parse_profile_steps(t.get("profile_steps", ""))
        self.trace_dir = os.path.join(workdir, "profile")
        self.tracing = False
        self.model_cfg = config.model.to_dict()
        self.vocab = vocab
        peak = float(t.get("peak_tflops", 0.0) or 0.0)
        if peak < 0:
            raise ConfigError(f"train.peak_tflops: must be >= 0 (0: the known table), got {peak}")
        if not peak and jax.default_backend() != "cpu":
            peak = device_peak_tflops(jax.devices()[0].device_kind, self.model_cfg.get("dtype"))
        self.peak_flops = peak * 1e12 * jax.device_count() if peak else None
        if self.model_cfg["name"] not in SINGLE_STACK:
            self.peak_flops = None
        self.flops: dict[int, float] = {}  # step (1-based, as rows count) -> model FLOPs
        self.placed = 0
        self.last_row = None

    def place(self, place, start: int):
        """Wrap the loop's batch placement: step start + i is the i-th batch placed."""
        self.placed = start

        def wrapped(batch: dict) -> dict:
            self.placed += 1
            if self.peak_flops:
                B, T = batch["inputs"].shape
                B *= jax.process_count()
                self.flops[self.placed] = flops_per_step(
                    self.model_cfg, vocab=self.vocab, batch=B, length=T
                )
            return place(batch)

        return wrapped

    def mfu(self, step: int, timing: dict) -> float | None:
        """MFU over the steps since the previous row (the window of timing's steps_per_s)."""
        if not self.peak_flops:
            return None
        first = step if self.last_row is None else self.last_row + 1
        self.last_row = step
        window = [self.flops.pop(s) for s in range(first, step + 1) if s in self.flops]
        for s in [s for s in self.flops if s < first]:
            del self.flops[s]
        if not window or not timing.get("steps_per_s"):
            return None
        return float(np.mean(window) * timing["steps_per_s"] / self.peak_flops)

    def step_started(self, step: int) -> None:
        """Before step `step` (0-based) is dispatched: start the trace at the window's start."""
        if self.window and step == self.window[0] and not self.tracing:
            os.makedirs(self.trace_dir, exist_ok=True)
            jax.profiler.start_trace(self.trace_dir)
            self.tracing = True
            log.info("profiling steps %d..%d into %s", *self.window, self.trace_dir)

    def metrics_seen(self, step: int) -> None:
        """After the metrics of `step` steps are on the host: stop at the window's end."""
        if self.tracing and step >= self.window[1]:
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            log.info("profile trace written to %s", self.trace_dir)
