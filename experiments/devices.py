"""Which devices a sweep's child process sees: `--devices_per_run` (experiments/sweep.py).

A small model spread data-parallel over a node's 8 GPUs spends its steps in all-reduces; the
same node trains 8 such runs at once when each child sees one GPU. The sweep never imports
JAX itself (that would claim the accelerator in the sweep process): `probe` asks a short
child process for the backend and the local device count, and `DevicePool` hands each child
a disjoint slot of devices through the environment:

- GPU: CUDA_VISIBLE_DEVICES (the child's JAX sees only its slot);
- TPU: TPU_VISIBLE_CHIPS (and the older TPU_VISIBLE_DEVICES), TPU_CHIPS_PER_PROCESS_BOUNDS
  for the slot's shape (1, 2 or 4 chips of a TPU VM host), TPU_PROCESS_BOUNDS=1,1,1 and a
  port of its own for the slot's mesh controller (JAX's documented recipe for several
  processes on one TPU VM);
- CPU: no exclusivity (the cores are shared, `--parallel` decides how many run); each child
  gets --xla_force_host_platform_device_count=N in XLA_FLAGS, so N emulated devices.

`devices_per_run` 0 means all of the host's devices for every child (one child at a time on
an accelerator). `default_devices_per_run(config)` is 1 for models under SMALL_MODEL_PARAMS
parameters, which an accelerator runs fastest alone, else 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

SMALL_MODEL_PARAMS = 100_000_000
TPU_BASE_PORT = 8476
# Chips per process -> TPU_CHIPS_PER_PROCESS_BOUNDS (x, y, z) on a TPU VM host.
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
_HOST_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S+")


def probe() -> dict:
    """{"backend", "count"} of JAX in a child process ({"backend": "cpu", "count": 1} if that
    fails, or at once when JAX_PLATFORMS asks for the CPU)."""
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return {"backend": "cpu", "count": 1}
    code = "import jax, json; print(json.dumps([jax.default_backend(), jax.local_device_count()]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    try:
        backend, count = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"backend": "cpu", "count": 1}
    return {"backend": backend, "count": int(count)}


def approx_params(model_cfg) -> int:
    """Parameters of a Transformer model block, roughly (12 L d^2 + the embeddings); 0 for
    blocks without those fields."""
    L, D = model_cfg.get("num_layers", 0), model_cfg.get("d_model", 0)
    F = model_cfg.get("mlp_dim", 4 * D)
    layers = (2 if model_cfg.get("name") == "encoder_decoder" else 1) * L
    return int(layers * (4 * D * D + 2 * D * F) + 2 * 512 * D)


def default_devices_per_run(config) -> int:
    """1 for a small model (under SMALL_MODEL_PARAMS), 0 (all devices) otherwise."""
    model = config.get("model")
    size = approx_params(model.to_dict()) if model is not None else 0
    return 1 if size < SMALL_MODEL_PARAMS else 0


def env_for(backend: str, devices: list[int], slot: int) -> dict[str, str]:
    """Environment variables that give a child exactly `devices` of this host."""
    ids = ",".join(str(d) for d in devices)
    if backend == "gpu":
        return {"CUDA_VISIBLE_DEVICES": ids}
    if backend == "tpu":
        port = str(TPU_BASE_PORT + slot)
        return {
            "TPU_VISIBLE_CHIPS": ids,
            "TPU_VISIBLE_DEVICES": ids,
            "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOUNDS[len(devices)],
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": port,
            "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
            "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
            "TPU_MESH_CONTROLLER_PORT": port,
        }
    return {}


def cpu_xla_flags(flags: str, count: int) -> str:
    """XLA_FLAGS with the host platform device count set to `count` (replacing any)."""
    rest = _HOST_COUNT.sub("", flags).split()
    return " ".join([*rest, f"--xla_force_host_platform_device_count={count}"])


@dataclasses.dataclass
class DevicePool:
    """Disjoint slots of `per_run` devices; a child holds one while it runs."""

    backend: str
    count: int
    per_run: int  # 0: all devices

    def __post_init__(self):
        if self.per_run < 0:
            raise ValueError(f"--devices_per_run: must be >= 0 (0: all), got {self.per_run}")
        n = self.per_run or self.count
        if self.backend != "cpu":
            if n > self.count:
                raise ValueError(
                    f"--devices_per_run: {n} but this host has {self.count} {self.backend} devices"
                )
            if self.backend == "tpu" and n not in TPU_BOUNDS and n != self.count:
                raise ValueError(
                    f"--devices_per_run: a TPU host splits into slots of "
                    f"{', '.join(map(str, TPU_BOUNDS))} chips or all {self.count}, got {n}"
                )
        self.size = n
        slots = 1 if self.backend == "cpu" else self.count // n
        self.free = list(range(slots))

    @property
    def capacity(self) -> int | None:
        """How many children can hold a slot at once (None: no limit, CPU)."""
        return None if self.backend == "cpu" else self.count // self.size

    def acquire(self, base_env: dict[str, str]) -> tuple[int, dict[str, str]] | None:
        """(slot, the child's environment), or None when every slot is taken."""
        if self.backend == "cpu":
            if not self.per_run:
                return -1, dict(base_env)
            flags = cpu_xla_flags(base_env.get("XLA_FLAGS", ""), self.per_run)
            return -1, {**base_env, "XLA_FLAGS": flags}
        if not self.free:
            return None
        slot = self.free.pop(0)
        if self.size == self.count:
            return slot, dict(base_env)
        devices = list(range(slot * self.size, (slot + 1) * self.size))
        return slot, {**base_env, **env_for(self.backend, devices, slot)}

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free.append(slot)
            self.free.sort()


def describe(pool: DevicePool) -> str:
    if pool.backend == "cpu":
        return f"{pool.per_run or 'default'} CPU devices per run"
    return f"{pool.size} of {pool.count} {pool.backend} devices per run, {pool.capacity} at once"


__all__ = [
    "DevicePool",
    "approx_params",
    "default_devices_per_run",
    "describe",
    "env_for",
    "probe",
]
