#!/usr/bin/env bash
# The one entry point for people. `./launch.sh` sets up .venv on first use and runs the
# quickstart ablation; `./launch.sh test` runs the test suite; other modes pass through to
# the Python entry points. `./launch.sh --help` lists them. Sourcing it (tests do) defines
# the functions and runs nothing.
#
# Accelerators: set-up detects an NVIDIA GPU (nvidia-smi; the driver's CUDA major picks
# jax[cuda12] or jax[cuda13]) or a TPU VM (/dev/accel*, or /dev/vfio with a Google PCI device
# or a TPU VM's environment) and installs the matching jax extra of pyproject.toml;
# ATTN_ACCELERATOR=cpu|cuda12|cuda13|tpu overrides. ATTN_USE_SYSTEM_JAX=1 uses the JAX that
# is already installed (a cluster image; python3, or ATTN_PYTHON) instead of .venv: the
# project runs from this directory and only what that Python lacks is installed (from the
# wheels in .whl/ when that folder exists, without the package index).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
ACCELERATORS="cpu cuda12 cuda13 tpu"
WHEELS="${ATTN_WHEELS:-$ROOT/.whl}"
SYSTEM_DEPS="$VENV/system-deps"
# Modules the project imports and the requirement that provides each (pyproject.toml).
SYSTEM_MODULES="flax:flax~=0.12 optax:optax>=0.2.4 orbax.checkpoint:orbax-checkpoint>=0.11
tensorflow_datasets:tensorflow-datasets>=4.9.7 array_record:array-record>=0.7 grain:grain>=0.2.10
ml_collections:ml-collections>=1.0 absl:absl-py>=2.1 matplotlib:matplotlib>=3.8
tensorboardX:tensorboardX>=2.6 tqdm:tqdm>=4.66"
# What a system-JAX image may lack, with what those need (`./launch.sh wheels` fetches them).
WHEEL_PACKAGES="ml-collections tensorflow-datasets array-record grain tensorboardX dm-tree
docstring-parser googleapis-common-protos immutabledict portpicker promise simple-parsing
tensorflow-metadata termcolor toml"

usage() {
  cat <<'TXT'
usage: ./launch.sh [MODE] [ARGS...]

modes:
  (none)        set up .venv if missing, then run the quickstart ablation (6 encodings, 1 task)
  test          run the test suite (pytest, slow tests excluded); extra args go to pytest
  test-cluster  the tests that start a real single-node SLURM (tests/test_slurm.py, minutes; as
                root, installs slurm-wlm and munge with apt-get if missing)
  train         train a config:      ./launch.sh train --config configs/formal.py:pe=alibi --workdir runs/a
  eval          evaluate a workdir:  ./launch.sh eval --workdir runs/a [--lengths 40,80,160]
  sweep         run a config's grid: ./launch.sh sweep --config configs/quickstart.py --workdir runs/q
                [--backend slurm --slurm_partition P ...]; where its points are: --status runs/q
  compare       tables and plots:    ./launch.sh compare runs/q [runs/r ...] --out reports/q
  reproduce     a paper's claims:    ./launch.sh reproduce press --mini [--parallel 2]; --results
  bench         benchmarks:          ./launch.sh bench [--workload w1 ...] [--vs x-transformers]
  generate      sample from a run:   ./launch.sh generate --workdir runs/lm --prompt "def "
  multi N ...   N local processes (multi-host path on one machine): ./launch.sh multi 2 train ...
  check         what JAX sees, then every PE x attention impl in bf16 against float32 (minutes
                on a GPU/TPU, a reduced set in seconds on a CPU): ./launch.sh check [--full]
  device-check  check, then the accelerator benchmark (bench --workload gpu); logs in
                reports/device-check/ (the one command for a new GPU machine)
  wheels        download into .whl/ the wheels a system-JAX image lacks (for a machine
                without the package index: then ATTN_USE_SYSTEM_JAX=1 ./launch.sh device-check)
  setup         only create/update the virtual environment
  --help        this message (sets up the environment first if it is missing)

environment:
  ATTN_ACCELERATOR=cpu|cuda12|cuda13|tpu   the jax build set-up installs (default: detected)
  ATTN_USE_SYSTEM_JAX=1                    use the installed JAX (python3 or ATTN_PYTHON)
TXT
}

# The accelerator set-up installs for: ATTN_ACCELERATOR, else what this machine has. A bad
# ATTN_ACCELERATOR is one line and status 2. ATTN_SYSROOT prefixes /dev and /sys (tests).
detect_accelerator() {
  local want="${ATTN_ACCELERATOR:-}"
  if [[ -n "$want" ]]; then
    if [[ " $ACCELERATORS " != *" $want "* ]]; then
      echo "launch.sh: ATTN_ACCELERATOR='$want'; valid: ${ACCELERATORS// /, }" >&2
      return 2
    fi
    echo "$want"
    return 0
  fi
  local sys="${ATTN_SYSROOT:-}"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    local cuda
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -1)
    if [[ -n "$cuda" && "$cuda" -ge 13 ]]; then echo cuda13; else echo cuda12; fi
    return 0
  fi
  if compgen -G "$sys/dev/accel[0-9]*" >/dev/null; then
    echo tpu
    return 0
  fi
  if compgen -G "$sys/dev/vfio/[0-9]*" >/dev/null; then
    # TPU v5e/v5p/v6e VMs expose their chips through vfio: Google's PCI vendor id, or the
    # environment of a TPU VM, tells them from other vfio devices.
    if grep -qsx 0x1ae0 "$sys"/sys/bus/pci/devices/*/vendor ||
      [[ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_WORKER_ID:-}${TPU_NAME:-}" ]]; then
      echo tpu
      return 0
    fi
  fi
  echo cpu
}

# pyproject extras for an accelerator: .[test] on a CPU, .[test,cuda12] and so on.
install_target() {
  if [[ "$1" == cpu ]]; then echo ".[test]"; else echo ".[test,$1]"; fi
}

find_python() {
  for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  echo "launch.sh: Python 3.11 or newer is required (none found on PATH)" >&2
  return 1
}

ensure_env() {
  if [[ "${ATTN_USE_SYSTEM_JAX:-}" == 1 ]]; then
    ensure_system_env
    return
  fi
  local stamp="$VENV/.installed" accel
  accel=$(detect_accelerator) || exit 2
  if [[ -x "$PY" && -f "$stamp" && ! pyproject.toml -nt "$stamp" ]] &&
    [[ "$(cat "$stamp")" == "$accel" || (-z "$(cat "$stamp")" && "$accel" == cpu) ]]; then
    fetch_jemalloc # once per .venv (an environment made before jemalloc was the default)
    return 0
  fi
  local base
  base=$(find_python)
  if [[ ! -x "$PY" ]]; then
    echo "launch.sh: creating virtual environment in .venv" >&2
    "$base" -m venv "$VENV"
  fi
  echo "launch.sh: installing attn and its dependencies into .venv for $accel (jax $(install_target "$accel"))" >&2
  "$PY" -m pip install --quiet --upgrade pip >&2 || true
  "$PY" -m pip install --quiet -e "$(install_target "$accel")" >&2
  fetch_jemalloc
  echo "$accel" >"$stamp"
}

# ATTN_USE_SYSTEM_JAX=1: the Python that has JAX (python3, or ATTN_PYTHON) runs the project
# from this directory. What it lacks of SYSTEM_MODULES comes from the wheels in .whl/ when that
# folder exists (installed into .venv/system-deps without the index and without dependency
# resolution: the wheels are the missing closure, as `./launch.sh wheels` fetches it), else
# from the package index into that Python's own environment, with its jax pinned so that pip
# adds only what is missing. One line and status 2 if that Python has no JAX, or one older
# than pyproject.toml allows.
ensure_system_env() {
  PY="${ATTN_PYTHON:-python3}"
  export PYTHONPATH="$SYSTEM_DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  local version
  if ! version=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null); then
    echo "launch.sh: ATTN_USE_SYSTEM_JAX=1, but $PY cannot import jax; install JAX there or unset ATTN_USE_SYSTEM_JAX" >&2
    exit 2
  fi
  if ! "$PY" -c 'import sys, jax; v = tuple(int(x) for x in jax.__version__.split(".")[:2]); sys.exit(v < (0, 6))'; then
    echo "launch.sh: the system's jax $version is older than pyproject.toml allows (jax>=0.6)" >&2
    exit 2
  fi
  local missing
  missing=$(missing_modules)
  if [[ -z "$missing" ]]; then
    return 0
  fi
  echo "launch.sh: using the system's jax $version ($PY); installing what it lacks: $missing" >&2
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    mkdir -p "$SYSTEM_DEPS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SYSTEM_DEPS" \
      "$WHEELS"/*.whl >&2
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q "jax==$version" $missing >&2
  fi
  missing=$(missing_modules)
  if [[ -n "$missing" ]]; then
    echo "launch.sh: $PY still lacks $missing after the install" >&2
    exit 1
  fi
}

# Requirements of SYSTEM_MODULES whose module $PY cannot find, space separated.
missing_modules() {
  local pair out=()
  for pair in $SYSTEM_MODULES; do
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${pair%%:*}') is None)" 2>/dev/null; then
      out+=("${pair#*:}")
    fi
  done
  echo "${out[*]:-}"
}

# Wheels (CPython 3.12, manylinux x86-64) of WHEEL_PACKAGES into .whl/, for a system-JAX
# machine that cannot reach the package index. Pure-Python sdists (promise) are built here.
fetch_wheels() {
  local python_version="${ATTN_WHEELS_PYTHON:-3.12}" pkg
  mkdir -p "$WHEELS"
  for pkg in $WHEEL_PACKAGES; do
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$WHEELS" "$pkg" 2>/dev/null; then
      "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$pkg" >&2
    fi
  done
  echo "launch.sh: wheels in $WHEELS: $(find "$WHEELS" -name '*.whl' | wc -l) files, $(du -sh "$WHEELS" | cut -f1)" >&2
}

run_py() {
  exec "$PY" "$@"
}

# glibc malloc with transparent huge pages (glibc >= 2.35; ignored elsewhere). XLA:CPU maps a
# fresh temp buffer for every execution (144 MB for a w1 train step at T=32) and unmaps it
# after, so with 4 KiB pages each step took ~35k page faults and ~60 ms of kernel time;
# 2 MiB pages cut the faults ~70x and the kernel time ~3x (README, Performance). Kept if the
# caller already chose a value.
# jemalloc (default where found; ATTN_MALLOC=auto) is preloaded with freed pages kept (no
# decay, huge pages): XLA's per-step temp buffer is then reused, not mapped again (README,
# Performance, has the measurements). Looked up in ATTN_JEMALLOC_LIB, the system's library directories, then
# .venv/jemalloc (Debian's libjemalloc2 unpacked there at set-up without root: `fetch_jemalloc`).
# ATTN_MALLOC=glibc keeps glibc; ATTN_MALLOC=jemalloc insists (one line and exit 2 without it).
JEMALLOC_CONF="thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_SYSTEM_LIBS="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2
  /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2"
find_jemalloc() {
  local lib
  if [[ -n "${ATTN_JEMALLOC_LIB:-}" ]]; then
    [[ -r "$ATTN_JEMALLOC_LIB" ]] && echo "$ATTN_JEMALLOC_LIB"
    return 0
  fi
  for lib in $JEMALLOC_SYSTEM_LIBS "$VENV"/jemalloc/usr/lib/*/libjemalloc.so.2; do
    if [[ -r "$lib" ]]; then
      echo "$lib"
      return 0
    fi
  done
}

tune_malloc() {
  if [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb=* ]]; then
    export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
  fi
  local lib
  case "${ATTN_MALLOC:-auto}" in
    glibc) return 0 ;;
    auto | jemalloc) lib=$(find_jemalloc) ;;
    *)
      echo "launch.sh: ATTN_MALLOC='${ATTN_MALLOC}'; one of auto (default: jemalloc where found, else glibc), jemalloc, glibc" >&2
      exit 2
      ;;
  esac
  if [[ -z "$lib" ]]; then
    if [[ "${ATTN_MALLOC:-auto}" == jemalloc ]]; then
      echo "launch.sh: ATTN_MALLOC=jemalloc, but no libjemalloc.so.2 was found (apt-get install libjemalloc2, or set ATTN_JEMALLOC_LIB)" >&2
      exit 2
    fi
    return 0
  fi
  [[ ":${LD_PRELOAD:-}:" == *":$lib:"* ]] || export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  export MALLOC_CONF="${MALLOC_CONF:-$JEMALLOC_CONF}"
}

# Debian's libjemalloc2 unpacked into .venv/jemalloc without root (apt-get download and
# dpkg-deb -x), where the system has none; best effort, tried once per .venv (the stamp
# .venv/.jemalloc-tried; delete it to try again): without apt, glibc stays.
fetch_jemalloc() {
  [[ "${ATTN_MALLOC:-auto}" == auto && ! -e "$VENV/.jemalloc-tried" && -z "$(find_jemalloc)" ]] ||
    return 0
  touch "$VENV/.jemalloc-tried" # one try per .venv: no download on every launch when offline
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || return 0
  local tmp
  tmp=$(mktemp -d)
  if (cd "$tmp" && timeout 60 apt-get download -q -o Acquire::Retries=0 -o Acquire::http::Timeout=10 \
    libjemalloc2 >/dev/null 2>&1) &&
    mkdir -p "$VENV/jemalloc" &&
    dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$VENV/jemalloc" 2>/dev/null && [[ -n "$(find_jemalloc)" ]]; then
    echo "launch.sh: jemalloc unpacked into .venv/jemalloc (ATTN_MALLOC=glibc turns it off)" >&2
    tune_malloc
  else
    echo "launch.sh: no jemalloc (apt-get download libjemalloc2 failed); glibc malloc with huge pages" >&2
  fi
  rm -rf "$tmp"
}

main() {
  set -euo pipefail
  cd "$ROOT"
  tune_malloc
  local mode="${1:-quickstart}"
  [[ $# -gt 0 ]] && shift

  case "$mode" in
    -h | --help | help)
      ensure_env
      usage
      ;;
    setup)
      ensure_env
      ;;
    test)
      ensure_env
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
      run_py -m pytest -q -n 2 --dist loadfile "$@"
      ;;
    test-cluster)
      ensure_env
      run_py -m pytest -q -m cluster tests/test_slurm.py "$@"
      ;;
    quickstart)
      ensure_env
      run_py -m experiments.quickstart "$@"
      ;;
    train | eval)
      ensure_env
      run_py -m experiments.main --mode "$mode" "$@"
      ;;
    bench)
      ensure_env
      if [[ " $* " == *" --vs "* || " $* " == *" --vs="* ]]; then
        run_py -m experiments.bench_peer "$@" # the side-by-side peer benchmark (bench_peer.py)
      else
        run_py -m experiments.bench "$@"
      fi
      ;;
    sweep | compare | generate | reproduce)
      ensure_env
      run_py -m "experiments.$mode" "$@"
      ;;
    check)
      ensure_env
      run_py -m experiments.check "$@"
      ;;
    device-check)
      ensure_env
      local out="${ATTN_REPORT_DIR:-$ROOT/reports/device-check}"
      mkdir -p "$out"
      local status=0
      "$PY" -m experiments.check --json "$out/check.json" "$@" 2>&1 | tee "$out/check.log" ||
        status=1
      "$PY" -m experiments.bench --workload gpu 2>&1 | tee "$out/bench_gpu.log" || status=1
      echo "launch.sh: device-check logs in $out" >&2
      exit "$status"
      ;;
    wheels)
      ensure_env
      fetch_wheels
      ;;
    multi)
      if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
        echo "usage: ./launch.sh multi N train|eval ARGS...   (N local processes of experiments.main)" >&2
        [[ "${1:-}" == -h || "${1:-}" == --help ]] && exit 0
        exit 2
      fi
      ensure_env
      local n="$1" sub="$2"
      shift 2
      run_py -m experiments.multi --num_processes "$n" --mode "$sub" -- "$@"
      ;;
    *)
      echo "launch.sh: unknown mode '$mode'; valid modes: test test-cluster train eval sweep compare reproduce bench generate multi check device-check wheels setup --help" >&2
      exit 2
      ;;
  esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
