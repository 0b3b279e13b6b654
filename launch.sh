#!/usr/bin/env bash
# The one entry point for people. `./launch.sh` sets up .venv on first use and runs the
# quickstart ablation; `./launch.sh test` runs the test suite; other modes pass through to
# the Python entry points. `./launch.sh --help` lists them. Sourcing it (tests do) defines
# the functions and runs nothing.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

usage() {
  cat <<'TXT'
usage: ./launch.sh [MODE] [ARGS...]

modes:
  (none)        set up .venv if missing, then run the quickstart ablation (6 encodings, 1 task)
  test          run the test suite (pytest, slow tests excluded); extra args go to pytest
  train         train a config:      ./launch.sh train --config configs/formal.py:pe=alibi --workdir runs/a
  eval          evaluate a workdir:  ./launch.sh eval --workdir runs/a [--lengths 40,80,160]
  sweep         run a config's grid: ./launch.sh sweep --config configs/quickstart.py --workdir runs/q
  compare       tables and plots:    ./launch.sh compare runs/q [runs/r ...] --out reports/q
  bench         benchmarks:          ./launch.sh bench [--workload w1 ...]
  generate      sample from a run:   ./launch.sh generate --workdir runs/lm --prompt "def "
  multi N ...   N local processes (multi-host path on one machine): ./launch.sh multi 2 train ...
  setup         only create/update the virtual environment
  --help        this message (sets up the environment first if it is missing)
TXT
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
  local stamp="$VENV/.installed"
  if [[ -x "$PY" && -f "$stamp" && ! pyproject.toml -nt "$stamp" ]]; then
    return 0
  fi
  local base
  base=$(find_python)
  if [[ ! -x "$PY" ]]; then
    echo "launch.sh: creating virtual environment in .venv" >&2
    "$base" -m venv "$VENV"
  fi
  echo "launch.sh: installing attn and its dependencies into .venv (first run only)" >&2
  "$PY" -m pip install --quiet --upgrade pip >&2 || true
  "$PY" -m pip install --quiet -e ".[test]" >&2
  touch "$stamp"
}

run_py() {
  exec "$PY" "$@"
}

# glibc malloc with transparent huge pages (glibc >= 2.35; ignored elsewhere). XLA:CPU maps a
# fresh temp buffer for every execution (144 MB for a w1 train step at T=32) and unmaps it
# after, so with 4 KiB pages each step took ~35k page faults and ~60 ms of kernel time;
# 2 MiB pages cut the faults ~70x and the kernel time ~3x (README, Performance). Kept if the
# caller already chose a value.
tune_malloc() {
  if [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb=* ]]; then
    export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
  fi
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
    quickstart)
      ensure_env
      run_py -m experiments.quickstart "$@"
      ;;
    train | eval)
      ensure_env
      run_py -m experiments.main --mode "$mode" "$@"
      ;;
    sweep | compare | bench | generate)
      ensure_env
      run_py -m "experiments.$mode" "$@"
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
      echo "launch.sh: unknown mode '$mode'; valid modes: test train eval sweep compare bench generate multi setup --help" >&2
      exit 2
      ;;
  esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
