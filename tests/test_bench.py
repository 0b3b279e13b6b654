"""Smoke tests for experiments/bench.py: every workload runs at --smoke sizes and prints valid
JSON lines (one per measurement, with the machine description) followed by the table.

No timing is asserted: the numbers of a smoke run mean nothing.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import bench

KEYS = {"workload", "variant", "metric", "machine"}
STATS = {"median", "min", "max", "repeats", "unit"}


def run(capsys, *argv):
    bench.main(["--smoke", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    table_at = next(i for i, line in enumerate(out) if line.startswith("| workload |"))
    assert all(not line.startswith("{") for line in out[table_at:]), "the table comes last"
    for row in rows:
        assert KEYS <= set(row), row
        assert row["metric"] == "note" or STATS <= set(row), row
        assert {"cpu", "cores", "jax", "backend"} <= set(row["machine"])
    return rows


def metrics(rows, workload):
    return {(r["variant"], r["metric"]) for r in rows if r["workload"] == workload}


@pytest.mark.slow  # ~30 s on 2 cores; tests/test_bench_peer.py steps bench's builders fast
def test_in_process_workloads(capsys):
    rows = run(capsys, "--workload", "w1", "w2", "seeds", "gpu", "--variants", "alibi")
    peak = [r for r in rows if r["workload"] == "peak"]
    assert peak and peak[-1]["median"] > 0
    assert {("alibi", "steps_per_s"), ("alibi", "steps_per_s_1000_with_compile")} <= metrics(
        rows, "w1"
    )
    compiles = next(r for r in rows if r["workload"] == "w1" and r["metric"] == "compile_s_total")
    assert compiles["compilations"] >= 1 and compiles["late_compiles"] == 0
    faults = next(r for r in rows if r["metric"] == "page_faults_per_step")
    assert faults["min"] >= 0 and ("alibi", "kernel_ms_per_step") in metrics(rows, "w1")
    w2 = [r for r in rows if r["workload"] == "w2" and r["metric"] == "gflops_per_s"]
    assert w2 and 0 < w2[0]["mfu"]
    assert ("alibi/2_seeds", "vmapped_speedup") in metrics(rows, "seeds")
    gpu = [r for r in rows if r["workload"] == "gpu"]
    if jax.default_backend() == "gpu":
        assert {("w2_large_bf16", "steps_per_s"), ("w2_large_bf16", "gflops_per_s")} <= metrics(
            rows, "gpu"
        )
    else:
        assert [r.get("note", "") for r in gpu] == [
            f"skipped: no GPU backend (backend is {jax.default_backend()})"
        ]


@pytest.mark.slow  # fresh subprocesses, each importing JAX and compiling: ~30 s
@pytest.mark.parametrize("workload", ["long", "compile"])
def test_subprocess_workloads(capsys, workload):
    rows = run(capsys, "--workload", workload)
    got = [r for r in rows if r["workload"] == workload]
    assert got and not [r for r in got if "failed" in r.get("note", "")], got
    if workload == "long":
        assert {r["variant"] for r in got if r["metric"] == "peak_rss_gib"} == {
            f"{impl}/64" for impl in bench.LONG_IMPLS
        }
    else:
        warm = [r for r in got if r["variant"].endswith("persistent_cache_warm")]
        assert {r["metric"] for r in warm} == {"lower_s", "compile_s", "first_step_s"}


def test_transformer_flops_palm_formula():
    cfg = {
        "num_layers": 2,
        "d_model": 8,
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 0,
        "mlp_dim": 16,
        "mlp": "relu",
    }
    params = 2 * (4 * 8 * 8 + 2 * 8 * 16) + 8 * 10
    per_token = 6 * params + 12 * 2 * 8 * 4
    got = bench.transformer_flops(cfg, vocab=10, batch=3, length=4, train_step=True)
    assert got == per_token * 3 * 4
    assert bench.transformer_flops(cfg, vocab=10, batch=3, length=4, train_step=False) == got / 3


def tune_malloc(env: str) -> str:
    """GLIBC_TUNABLES after launch.sh's tune_malloc, starting from `env` (unset if None).
    Sourcing launch.sh defines its functions and runs nothing."""
    launch = Path(__file__).parents[1] / "launch.sh"
    setup = "unset GLIBC_TUNABLES" if env is None else f"export GLIBC_TUNABLES='{env}'"
    script = f'{setup}; source "{launch}"; tune_malloc; printf %s "$GLIBC_TUNABLES"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout


def test_launch_sh_turns_on_huge_page_malloc():
    assert tune_malloc(None) == "glibc.malloc.hugetlb=1"
    assert tune_malloc("") == "glibc.malloc.hugetlb=1"
    kept = "glibc.malloc.arena_max=2"
    assert tune_malloc(kept) == f"{kept}:glibc.malloc.hugetlb=1"
    assert tune_malloc("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"  # the caller's choice


def _malloc_env(
    tmp_path, choice: str | None, lib: Path, twice=False
) -> subprocess.CompletedProcess:
    launch = Path(__file__).parents[1] / "launch.sh"
    choose = "unset ATTN_MALLOC" if choice is None else f"export ATTN_MALLOC='{choice}'"
    script = (
        f"unset LD_PRELOAD MALLOC_CONF; {choose}; export ATTN_JEMALLOC_LIB='{lib}';"
        f' source "{launch}"; tune_malloc; {"tune_malloc;" if twice else ""}'
        ' printf "%s|%s" "${LD_PRELOAD:-}" "${MALLOC_CONF:-}"'
    )
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True)


def test_launch_sh_preloads_jemalloc_where_found(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    kept = f"{lib}|thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert _malloc_env(tmp_path, "glibc", lib).stdout == "|"
    for choice in (None, "auto", "jemalloc"):
        got = _malloc_env(tmp_path, choice, lib, twice=True)  # set-up calls it again
        assert got.returncode == 0 and got.stdout == kept, (choice, got.stderr)
    none = tmp_path / "none.so"
    for choice in (None, "auto"):  # the default falls back to glibc, silently
        got = _malloc_env(tmp_path, choice, none)
        assert got.returncode == 0 and got.stdout == "|" and got.stderr == ""
    missing = _malloc_env(tmp_path, "jemalloc", none)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "apt-get install libjemalloc2" in missing.stderr
    bad = _malloc_env(tmp_path, "tcmalloc", lib)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "ATTN_MALLOC='tcmalloc'; one of auto (default" in bad.stderr


def test_launch_sh_unpacks_jemalloc_without_root(tmp_path):
    """Set-up fetches Debian's package with `apt-get download` (a stand-in here) and unpacks it
    into .venv/jemalloc; where that fails, glibc stays and one line says so."""
    launch = Path(__file__).parents[1] / "launch.sh"
    pkg, bindir, venv = tmp_path / "pkg", tmp_path / "bin", tmp_path / "venv"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: libjemalloc2\nVersion: 1\nArchitecture: all\nMaintainer: t\nDescription: t\n"
    )
    (pkg / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (pkg / "usr/lib/x86_64-linux-gnu/libjemalloc.so.2").write_bytes(b"")
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is a Debian tool")
    subprocess.run(
        ["dpkg-deb", "-b", pkg, tmp_path / "libjemalloc2_1_all.deb"],
        check=True,
        capture_output=True,
    )
    bindir.mkdir()
    fake = bindir / "apt-get"
    fake.write_text(f'#!/bin/sh\ncp {tmp_path}/libjemalloc2_1_all.deb . && [ -z "$FAIL" ]\n')
    fake.chmod(0o755)

    def setup(fail: str) -> subprocess.CompletedProcess:
        script = (
            "unset LD_PRELOAD MALLOC_CONF ATTN_MALLOC ATTN_JEMALLOC_LIB;"
            f" export PATH={bindir}:$PATH"
            f' FAIL={fail}; source "{launch}"; VENV={venv}; JEMALLOC_SYSTEM_LIBS=;'
            ' fetch_jemalloc; printf "%s" "${LD_PRELOAD:-}"'
        )
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True)

    venv.mkdir()
    failed = setup("1")
    assert failed.returncode == 0 and failed.stdout == "" and "glibc" in failed.stderr
    again = setup("")  # one try per .venv: no second download on the next launch
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""
    (venv / ".jemalloc-tried").unlink()
    got = setup("")
    lib = venv / "jemalloc/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    assert got.returncode == 0 and got.stdout == str(lib) and lib.exists(), got.stderr
    # (the empty stand-in library cannot really be preloaded: ld.so says so after our line)
    assert "unpacked into .venv/jemalloc" in got.stderr.splitlines()[0]


@pytest.mark.skipif(sys.platform != "linux", reason="GLIBC_TUNABLES is a glibc (Linux) setting")
def test_note_when_the_allocator_settings_are_off(capsys, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    rows = run(capsys, "--workload", "gpu")
    notes = [r for r in rows if r["workload"] == "host"]
    assert [r["note"] for r in notes] == [bench.JEMALLOC_HINT, bench.HUGETLB_HINT]
    assert rows[0]["machine"]["glibc_tunables"] == "glibc.malloc.arena_max=2"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    rows = run(capsys, "--workload", "gpu")
    assert [r["note"] for r in rows if r["workload"] == "host"] == [bench.JEMALLOC_HINT]
    # the notes read the variable (what launch.sh exported), not what the process loaded
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert not [r for r in run(capsys, "--workload", "gpu") if r["workload"] == "host"]
