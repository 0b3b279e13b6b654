"""Accelerator paths checked on a CPU: what reaches cuDNN, launch.sh's detection, check.

The cuDNN seam: `attn.attention.backend` is made to answer "gpu" and
`jax.nn.dot_product_attention` is replaced by a recorder that runs the recorded call with
implementation="xla" (which takes the same arguments on a CPU), so these tests pin down
exactly which bias, mask, flags and sequence lengths the cuDNN path hands to JAX, and that
the answer equals the reference.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn.models
from attn import attention
from attn.registry import ConfigError
from configs import formal
from experiments import profile, train
from experiments import state as state_lib
from experiments.workdir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Calls that reached jax.nn.dot_product_attention, each as its keyword dict, and the
    implementations `auto` picked, as (name, bias kind, mask kind)."""
    calls, picked = [], []
    real = jax.nn.dot_product_attention

    def record(q, k, v, bias=None, mask=None, **kw):
        calls.append({"bias": bias, "mask": mask, "q": q, **kw})
        assert kw["implementation"] == "cudnn"
        return real(q, k, v, bias=bias, mask=mask, **{**kw, "implementation": "xla"})

    def recorder(name, fn):
        def impl(q, k, v, *, bias, mask, **kw):
            kind = "none" if bias is None else ("callable" if callable(bias) else "array")
            picked.append((name, kind, attention.mask_kind(mask, q.shape[0], k.shape[1])))
            return fn(q, k, v, bias=bias, mask=mask, **kw)

        return impl

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    monkeypatch.setattr(attention, "backend", lambda: "gpu")
    monkeypatch.setattr(attention, "gpu_capability", lambda: 9.0)
    # flash runs in Pallas interpret mode on a CPU (slow): chunked computes the same thing.
    for name, fn in (
        ("cudnn", attention._cudnn),
        ("flash", attention.chunked_attention),
        ("chunked", attention.chunked_attention),
        ("dense", attention.dense_attention),
    ):
        monkeypatch.setitem(attention.IMPLEMENTATIONS, name, recorder(name, fn))
    attention._logged_choices.clear()
    return calls, picked


def _qkv(B=2, L=16, S=16, H=4, G=2, K=16, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(s), dtype)
        for s in ((B, L, H, K), (B, S, G, K), (B, S, G, K))
    )


def _padding(lengths, S):
    return (np.arange(S)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


def _close(got, want, atol=3e-2):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0
    )


def test_cudnn_reason_and_choice_for_a_gpu_backend_on_any_machine():
    q = (2, 1024, 8, 64)
    gpu = dict(dtype=jnp.bfloat16, backend="gpu")
    assert attention.cudnn_unsupported_reason(q, jnp.bfloat16, "gpu") is None
    assert "needs a GPU" in attention.cudnn_unsupported_reason(q, jnp.bfloat16, "cpu")
    assert "bfloat16" in attention.cudnn_unsupported_reason(q, jnp.float32, "gpu")
    assert "capability" in attention.cudnn_unsupported_reason(
        q, jnp.bfloat16, "gpu", capability=7.0
    )
    assert attention.choose_impl(q, q, causal=True, mask="key", **gpu) == "cudnn"
    assert attention.choose_impl(q, q, causal=True, window=64, **gpu) == "cudnn"
    # Right window, causal with L != S, a per-query mask, any bias: never cuDNN from auto.
    assert attention.choose_impl(q, q, window=64, **gpu) != "cudnn"
    assert attention.choose_impl((2, 8, 8, 64), q, causal=True, **gpu) != "cudnn"
    assert attention.choose_impl(q, q, mask="general", **gpu) != "cudnn"
    assert attention.choose_impl(q, q, array_bias=True, **gpu) != "cudnn"
    assert attention.choose_impl(q, q, callable_bias=True, flash=True, **gpu) == "flash"
    assert attention.choose_impl(q, q, callable_bias=True, causal=True, **gpu) == "chunked"
    assert attention.choose_impl(q, q, capability=7.5, **gpu) == "dense"


def test_key_padding_reaches_cudnn_as_sequence_lengths(fake_gpu):
    calls, _ = fake_gpu
    q, k, v = _qkv()
    mask = _padding([16, 9], 16)
    got = attention.dot_product_attention(q, k, v, mask=mask, causal=True, impl="cudnn")
    (call,) = calls
    assert call["bias"] is None and call["mask"] is None
    assert call["is_causal"] is True and "local_window_size" not in call
    assert call["key_value_seq_lengths"].dtype == jnp.int32
    np.testing.assert_array_equal(call["key_value_seq_lengths"], [16, 9])
    assert call.get("query_seq_lengths") is None
    want = attention.dot_product_attention(q, k, v, mask=mask, causal=True, impl="reference")
    _close(got, want)


def test_no_mask_no_bias_passes_nothing(fake_gpu):
    calls, _ = fake_gpu
    q, k, v = _qkv(L=8, S=24)
    got = attention.dot_product_attention(q, k, v, impl="cudnn")
    (call,) = calls
    assert call["bias"] is None and call["mask"] is None
    assert not {"is_causal", "key_value_seq_lengths"} & set(call)
    _close(got, attention.dot_product_attention(q, k, v, impl="reference"))


def test_bias_and_padding_never_add_a_mask_in_bf16(fake_gpu):
    calls, _ = fake_gpu
    q, k, v = _qkv()
    H, L, S = 4, 16, 16
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    bias = -slopes[:, None, None] * jnp.abs(jnp.arange(L)[:, None] - jnp.arange(S)[None, :])
    mask = _padding([16, 5], S)
    got = attention.dot_product_attention(q, k, v, bias=bias, mask=mask, causal=True, impl="cudnn")
    (call,) = calls
    assert call["mask"] is None
    assert call["bias"].shape == (1, H, L, S) and call["bias"].dtype == jnp.bfloat16
    # The bias reaches cuDNN as it is (causal and padding are flags and lengths, not bias).
    np.testing.assert_array_equal(call["bias"][0], bias.astype(jnp.bfloat16))
    np.testing.assert_array_equal(call["key_value_seq_lengths"], [16, 5])
    want = attention.dot_product_attention(
        q, k, v, bias=bias, mask=mask, causal=True, impl="reference"
    )
    _close(got, want)


@pytest.mark.parametrize("case", ["general_mask", "causal_L_ne_S", "right_window"])
def test_masks_cudnn_cannot_express_become_one_where_bias(fake_gpu, case):
    calls, _ = fake_gpu
    L, S = (4, 12) if case == "causal_L_ne_S" else (12, 12)
    q, k, v = _qkv(L=L, S=S)
    kw = {
        "general_mask": {"mask": np.tril(np.ones((L, S), bool))[None, None]},
        "causal_L_ne_S": {"causal": True},
        "right_window": {"window": 3},
    }[case]
    got = attention.dot_product_attention(q, k, v, impl="cudnn", **kw)
    (call,) = calls
    assert call["mask"] is None and "is_causal" not in call
    b = np.asarray(call["bias"], np.float32)
    assert call["bias"].dtype == jnp.bfloat16 and b.shape[2:] == (L, S)
    allowed = np.broadcast_to(
        attention.combined_mask(L, S, kw.get("mask"), kw.get("causal", False), kw.get("window")),
        b.shape,
    )
    assert (b[allowed] == 0).all() and (b[~allowed] < -1e37).all()
    _close(got, attention.dot_product_attention(q, k, v, impl="reference", **kw))


def test_rows_without_keys_are_zero_and_lengths_stay_positive(fake_gpu):
    calls, _ = fake_gpu
    q, k, v = _qkv(L=6, S=6)
    out = attention.dot_product_attention(q, k, v, mask=_padding([6, 0], 6), impl="cudnn")
    np.testing.assert_array_equal(calls[0]["key_value_seq_lengths"], [6, 1])
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    with pytest.raises(ValueError, match="right padding"):
        left = np.array([[False, True, True, True, True, True]] * 2)[:, None, None, :]
        attention.dot_product_attention(q, k, v, mask=left, impl="cudnn")


def _model_cfg(model, pe, **extra):
    cfg = attn.models.default_config(model)
    cfg.update(
        num_layers=1,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=32,
        dropout=0.0,
        dtype="bfloat16",
        pe={"name": pe},
        **extra,
    )
    return cfg


def _lm_batch(B=2, T=12, lengths=(12, 7), vocab=20):
    rng = np.random.default_rng(0)
    inputs = rng.integers(4, vocab, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    inputs = np.where(mask, inputs, 0)
    return {
        "inputs": jnp.asarray(inputs),
        "targets": jnp.asarray(inputs),
        "loss_mask": jnp.asarray(mask, jnp.float32),
        "token_mask": jnp.asarray(mask),
    }


NO_BIAS = ("none", "sinusoidal", "learned", "rope", "xpos")


# One case per kind of path runs by default; the other encodings of each kind are slow.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "pe,model,want",
    [("none", "decoder", "cudnn"), ("rope", "encoder", "cudnn"), ("alibi", "decoder", "flash")]
    + [("t5", "encoder", "flash"), ("fire", "decoder", "dense")]
    + [pytest.param(pe, "decoder", "cudnn", marks=_SLOW) for pe in NO_BIAS if pe != "none"]
    + [pytest.param("kerple", "decoder", "flash", marks=_SLOW)],
)
def test_what_each_pe_hands_to_attention_on_a_gpu(fake_gpu, pe, model, want):
    """bf16 models with right padding: no-bias PEs reach cuDNN with lengths and no bias or
    mask; bias PEs go to the flash kernel (their bias in float32, in-kernel), or where it
    cannot express them, chunked/dense; the outputs match the CPU's choice."""
    calls, picked = fake_gpu
    batch = _lm_batch()
    model_obj = attn.models.build(_model_cfg(model, pe), vocab_size=20, rngs=state_lib.rngs(0))
    got = model_obj(batch, train=False)
    names = {p[0] for p in picked}
    assert names == {want}, picked
    if want == "cudnn":
        assert calls and all(c["bias"] is None and c["mask"] is None for c in calls)
        for c in calls:
            np.testing.assert_array_equal(c["key_value_seq_lengths"], [12, 7])
            assert c.get("is_causal", False) == (model == "decoder")
    else:
        assert not calls
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "backend", lambda: "cpu")
        want_logits = model_obj(batch, train=False)
    real = np.asarray(batch["token_mask"])
    _close(np.asarray(got, np.float32)[real], np.asarray(want_logits, np.float32)[real], atol=5e-2)


# ------------------------------------------------------------------ observability


def test_known_peaks_and_profile_window_parsing():
    assert profile.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert profile.device_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert profile.device_peak_tflops("NVIDIA H200", "float32") == 494.7
    assert profile.device_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert profile.device_peak_tflops("TPU v5p", "float32") == 459.0
    assert profile.device_peak_tflops("cpu", "float32") is None
    assert profile.parse_profile_steps("") is None
    assert profile.parse_profile_steps("10,15") == (10, 15)
    for bad in ("15,10", "3", "a,b", "-1,2"):
        with pytest.raises(ConfigError, match="^train.profile_steps"):
            profile.parse_profile_steps(bad)


def test_profile_steps_write_a_trace_and_rows_carry_mfu(tmp_path):
    """The driver traces the asked steps into workdir/profile (TensorBoard's profile plugin
    layout) and, with a peak given, logs MFU; on a CPU without one, rows have no MFU."""
    config = formal.get_config("smoke=true")
    config.train.steps, config.train.profile_steps, config.train.peak_tflops = 4, "1,3", 0.5
    config.eval.compilation_cache, config.eval.lengths = "", "8"
    workdir = tmp_path / "run"
    train.run(config, str(workdir))
    assert list((workdir / "profile" / "plugins" / "profile").rglob("*.xplane.pb"))
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert rows and all(0 < r["mfu"] < 1 for r in rows if r["step"] > 1), rows
    stats = profile.StepStats(formal.get_config("smoke=true"), str(workdir), vocab=10)
    assert stats.peak_flops is None  # a CPU and no train.peak_tflops: no MFU


# ------------------------------------------------------------------ packing small runs


def _seed_states(n):
    from experiments import mesh as mesh_lib
    from experiments import optim, seeds

    config = formal.get_config("smoke=true")
    configs = [seeds.seed_config(config, s) for s in range(n)]
    device_mesh = mesh_lib.make_mesh(config)
    tx = optim.make_optimizer(config)
    graphdef, states = seeds.init_states(configs, device_mesh, tx)
    return config, configs, device_mesh, tx, graphdef, states


def test_vmapped_seeds_split_the_seed_axis_over_devices():
    """S seeds on 8 devices: the seed axis splits over the largest divisor of S (each device
    holds whole seeds, spec P("seeds")); model sharding keeps the replicated layout."""
    from experiments import mesh as mesh_lib
    from experiments import seeds

    config, _, device_mesh, _, _, states = _seed_states(1)
    for n, devices in ((2, 2), (3, 3), (4, 4), (16, 8)):
        place_state, _ = seeds.seed_placement(config, n, device_mesh)
        stacked = place_state(seeds.stack(states * n))
        leaf = jax.tree.leaves(stacked["params"])[0]
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("seeds")
        assert len(leaf.sharding.device_set) == devices, n
    config.train.mesh.model = 2
    keep, _ = seeds.seed_placement(config, 2, mesh_lib.make_mesh(config))
    stacked = seeds.stack(states * 2)
    assert keep(stacked) is stacked


@pytest.mark.slow  # compiles a vmapped and a plain step: ~25 s on 2 cores
def test_seed_split_program_gives_each_seeds_own_step():
    from experiments import mesh as mesh_lib
    from experiments import seeds

    config, configs, device_mesh, tx, graphdef, states = _seed_states(2)
    host = [next(train.host_batches(c, seed=c.seed, start=0)) for c in configs]
    place_state, place_batch = seeds.seed_placement(config, 2, device_mesh)
    _, split = seeds.make_vmapped_step(config, graphdef, tx)(
        place_state(seeds.stack(states)), place_batch(seeds.stack_batches(host))
    )
    single = train.make_train_step(config, graphdef, tx, donate=False)
    for i in range(2):
        _, alone = single(states[i], mesh_lib.shard_batch(host[i], device_mesh))
        np.testing.assert_allclose(split["loss"][i], alone["loss"], rtol=1e-5)


def test_device_pool_slots_per_backend():
    from experiments import devices

    gpu = devices.DevicePool("gpu", 8, 2)
    assert gpu.capacity == 4
    got = [gpu.acquire({"A": "1"}) for _ in range(5)]
    assert [g[1]["CUDA_VISIBLE_DEVICES"] for g in got[:4]] == ["0,1", "2,3", "4,5", "6,7"]
    assert got[4] is None and all(g[1]["A"] == "1" for g in got[:4])
    gpu.release(got[1][0])
    assert gpu.acquire({})[1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    everything = devices.DevicePool("gpu", 8, 0)
    assert everything.capacity == 1 and "CUDA_VISIBLE_DEVICES" not in everything.acquire({})[1]
    tpu = devices.DevicePool("tpu", 4, 1)
    slot, env = tpu.acquire({})
    slot2, env2 = tpu.acquire({})
    assert env["TPU_VISIBLE_CHIPS"] == "0" and env2["TPU_VISIBLE_CHIPS"] == "1"
    assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1" and env["TPU_PROCESS_BOUNDS"] == "1,1,1"
    assert env["TPU_MESH_CONTROLLER_PORT"] != env2["TPU_MESH_CONTROLLER_PORT"]
    assert devices.DevicePool("tpu", 4, 2).acquire({})[1]["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1"
    cpu = devices.DevicePool("cpu", 1, 4)
    flags = cpu.acquire({"XLA_FLAGS": "--a --xla_force_host_platform_device_count=8"})[1]
    assert flags["XLA_FLAGS"] == "--a --xla_force_host_platform_device_count=4"
    assert cpu.capacity is None and cpu.acquire({}) is not None  # CPU children share cores
    for bad in (("gpu", 2, 3), ("tpu", 4, 3), ("gpu", 2, -1)):
        with pytest.raises(ValueError, match="--devices_per_run"):
            devices.DevicePool(*bad)


SWEEP_GRID = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "decoder", "num_layers": 2, "d_model": 64})
    return c

def get_sweep(arg=None):
    return [{"seed": s} for s in range(4)]
"""

SWEEP_STUB = """
import os, pathlib, sys, time
from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "")
flags.DEFINE_string("mode", "train", "")
CONFIG = config_flags.DEFINE_config_file("config")

def main(_):
    wd = pathlib.Path(flags.FLAGS.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    seen = [os.environ.get(k, "-") for k in ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS")]
    (wd / "env").write_text(f"{time.time()} " + " | ".join(seen))
    time.sleep(0.5)
    (wd / "ends").write_text(str(time.time()))
    (wd / "DONE").write_text("")

app.run(main)
"""


def test_sweep_gives_each_child_its_own_device(tmp_path, monkeypatch):
    """2 probed "GPUs", a small model: one device per point, 2 points at once (parallel
    follows the slots), and no two points that ran at the same time saw the same device."""
    from experiments import sweep

    grid, stub = tmp_path / "grid.py", tmp_path / "stub.py"
    grid.write_text(SWEEP_GRID)
    stub.write_text(SWEEP_STUB)
    monkeypatch.setattr(sweep, "check_drift", lambda module, points: points)
    runs = tmp_path / "runs"
    status = sweep.run_sweep(
        str(grid),
        runs,
        parallel=None,
        driver=[sys.executable, str(stub)],
        probe=lambda: {"backend": "gpu", "count": 2},
    )
    assert not status.get("failed")
    seen = []
    for d in sorted(runs.iterdir()):
        if (d / "env").exists():
            start, rest = (d / "env").read_text().split(" ", 1)
            seen.append((float(start), float((d / "ends").read_text()), rest.split(" | ")[0]))
    assert len(seen) == 4 and {s[2] for s in seen} == {"0", "1"}
    for a in seen:
        for b in seen:
            if a is not b and a[0] < b[1] and b[0] < a[1]:  # overlapping in time
                assert a[2] != b[2]
    # On a CPU, --devices_per_run sets each child's emulated device count.
    status = sweep.run_sweep(
        str(grid),
        tmp_path / "cpu",
        devices_per_run=2,
        driver=[sys.executable, str(stub)],
        probe=lambda: {"backend": "cpu", "count": 1},
    )
    env = (tmp_path / "cpu" / "seed=0" / "env").read_text()
    assert "--xla_force_host_platform_device_count=2" in env


def test_default_devices_per_run_is_one_for_small_models():
    import ml_collections

    from experiments import devices

    small = ml_collections.ConfigDict({"model": {"num_layers": 12, "d_model": 768}})
    big = ml_collections.ConfigDict({"model": {"num_layers": 24, "d_model": 2048}})
    assert devices.default_devices_per_run(small) == 1  # 125M-class: ~85M in the layers
    assert devices.default_devices_per_run(big) == 0


# ------------------------------------------------------------------ ./launch.sh check


def test_check_smoke_prints_what_jax_sees_and_passes(capsys, tmp_path):
    from experiments import check

    out_json = tmp_path / "check.json"
    args = ["--pes", "none", "--impls", "dense", "--length", "32", "--json", str(out_json)]
    assert check.main(args) == 0
    out = capsys.readouterr().out
    assert f"jax {jax.__version__}" in out and "backend cpu" in out
    assert "train  encoder pe=none" in out and "fused  dense vs chunked L=32" in out
    assert out.strip().splitlines()[-1].startswith("check: OK: 3 passed, 0 failed")
    import json

    assert json.loads(out_json.read_text())["verdict"] == "OK"


@pytest.mark.slow  # two more training compilations: ~10 s on 2 cores
def test_check_fails_on_a_wrong_mask_and_a_cpu_fallback(monkeypatch, capsys):
    from experiments import check

    real = attention.IMPLEMENTATIONS["dense"]
    monkeypatch.setitem(
        attention.IMPLEMENTATIONS,
        "dense",
        lambda q, k, v, *, mask, **kw: real(q, k, v, mask=None, **kw),  # padding ignored
    )
    assert check.main(["--pes", "none", "--impls", "dense", "--no-fused"]) == 1
    assert "FAIL" in capsys.readouterr().out
    problem = check.backend_problem({"installed_for": "cuda12", "backend": "cpu"})
    assert "installed for cuda12 but its backend is cpu" in problem
    assert check.backend_problem({"installed_for": "cpu", "backend": "cpu"}) is None


# ------------------------------------------------------------------ launch.sh set-up


def _bash(script: str, tmp_path, *, env=None, stubs=None):
    """Run `script` after sourcing launch.sh, with PATH = stub commands + /usr/bin:/bin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (stubs or {}).items():
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n" + body + "\n")
        stub.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(
        ["bash", "-c", f'source "{ROOT / "launch.sh"}"; {script}'],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


NVIDIA_SMI = """if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-x)"; exit 0; fi
echo "| NVIDIA-SMI 580.159  Driver Version: 580.159  CUDA Version: {cuda}     |"
"""


@pytest.mark.parametrize("cuda,want", [("12.4", "cuda12"), ("13.0", "cuda13")])
def test_launch_detects_an_nvidia_gpu_and_its_cuda_major(tmp_path, cuda, want):
    got = _bash("detect_accelerator", tmp_path, stubs={"nvidia-smi": NVIDIA_SMI.format(cuda=cuda)})
    assert got.returncode == 0 and got.stdout.strip() == want, got.stderr
    target = _bash(f"install_target {want}", tmp_path)
    assert target.stdout.strip() == f".[test,{want}]"


def test_launch_detects_a_tpu_vm_and_falls_back_to_cpu(tmp_path):
    root = tmp_path / "root"
    sysroot = {"ATTN_SYSROOT": str(root)}
    assert _bash("detect_accelerator", tmp_path, env=sysroot).stdout.strip() == "cpu"
    # nvidia-smi present but no GPU answers: not a GPU machine.
    broken = {"nvidia-smi": "exit 9"}
    assert _bash("detect_accelerator", tmp_path, env=sysroot, stubs=broken).stdout.strip() == "cpu"
    (root / "dev" / "vfio").mkdir(parents=True)
    (root / "dev" / "vfio" / "0").write_text("")
    pci = root / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x10de\n")  # an NVIDIA device passed through vfio
    assert _bash("detect_accelerator", tmp_path, env=sysroot).stdout.strip() == "cpu"
    tpu_env = {**sysroot, "TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    assert _bash("detect_accelerator", tmp_path, env=tpu_env).stdout.strip() == "tpu"
    (pci / "vendor").write_text("0x1ae0\n")  # Google
    assert _bash("detect_accelerator", tmp_path, env=sysroot).stdout.strip() == "tpu"
    (root / "dev" / "vfio" / "0").unlink()
    (root / "dev" / "accel0").write_text("")  # TPU v4
    assert _bash("detect_accelerator", tmp_path, env=sysroot).stdout.strip() == "tpu"
    assert _bash("install_target tpu; install_target cpu", tmp_path).stdout.split() == [
        ".[test,tpu]",
        ".[test]",
    ]


def test_launch_accelerator_override_and_bad_value(tmp_path):
    gpu = {"nvidia-smi": NVIDIA_SMI.format(cuda="13.0")}
    got = _bash("detect_accelerator", tmp_path, env={"ATTN_ACCELERATOR": "cpu"}, stubs=gpu)
    assert got.stdout.strip() == "cpu"
    bad = _bash("detect_accelerator", tmp_path, env={"ATTN_ACCELERATOR": "rocm"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "launch.sh: ATTN_ACCELERATOR='rocm'; valid: cpu, cuda12, cuda13, tpu"
    ]
    # ensure_env stops on it before touching .venv
    bad = _bash("ensure_env", tmp_path, env={"ATTN_ACCELERATOR": "rocm"})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_launch_with_the_systems_jax(tmp_path):
    """ATTN_USE_SYSTEM_JAX=1: a Python with JAX and every module runs the project from the
    checkout, installing nothing; one without JAX is one line and status 2."""
    env = {"ATTN_USE_SYSTEM_JAX": "1", "ATTN_PYTHON": sys.executable}
    got = _bash('ensure_env; echo "$PY"; echo "$PYTHONPATH"', tmp_path, env=env)
    assert got.returncode == 0, got.stderr
    py, pythonpath = got.stdout.strip().splitlines()
    assert py == sys.executable and str(ROOT) in pythonpath.split(":")
    assert "installing" not in got.stderr
    nojax = {"python3": 'case "$2" in *"import jax"*) exit 1;; esac; exit 0'}
    got = _bash("ensure_env", tmp_path, env={"ATTN_USE_SYSTEM_JAX": "1"}, stubs=nojax)
    assert got.returncode == 2
    assert got.stderr.strip().splitlines() == [
        "launch.sh: ATTN_USE_SYSTEM_JAX=1, but python3 cannot import jax; install JAX there "
        "or unset ATTN_USE_SYSTEM_JAX"
    ]


# ------------------------------------------------------------------ bench --workload gpu


@pytest.mark.slow  # two train-step compilations: ~14 s on 2 cores
def test_gpu_workload_pieces_run_at_smoke_size_on_a_cpu():
    """The GPU benchmark's long-context child (ALiBi, auto, remat) and its data-parallel
    scaling step run here at smoke size; on a GPU the same code runs at 8k/32k tokens."""
    from experiments import bench

    spec = {"kind": "gpu_train", "pe": "alibi", "impl": "auto", "length": 32, "smoke": True}
    spec.update(model={"dtype": "bfloat16"}, remat="block", steps=1, repeats=1)
    res = bench.gpu_train_child(spec)
    assert res["steps_per_s"][0] > 0 and res["picked"] == ["dense"]
    rates = bench._dp_rate(bench.lm_config("rope", True), 2, 2, 16, steps=1, repeats=1)
    assert rates[0] > 0
