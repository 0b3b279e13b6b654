"""The quickstart: `./launch.sh` with no arguments runs a small, real ablation end to end.

It is the grid of configs/quickstart.py (one task, six positional encodings, trained briefly
and evaluated at four lengths, two of them beyond training) run by experiments.sweep with as
many points at once as there are CPU cores, then experiments.compare over the results: the
table on the terminal, the files in reports/quickstart, and what to run next. Re-running
skips the points already DONE and only redraws the report (`--fresh` starts over).

    python -m experiments.quickstart [--workdir runs/quickstart] [--out reports/quickstart]
        [--parallel N] [--fresh]
"""

import os
import shutil
import sys
import time
from pathlib import Path

from experiments import compare, sweep
from experiments.config_utils import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.py"


def main(argv=None) -> int:
    parser = ArgumentParser(prog="quickstart", description=__doc__)
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--out", default="reports/quickstart")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="points at once (default: the number of CPU cores, at most the grid size)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
    args = parser.parse_args(argv)
    parser.check(args.parallel is None or args.parallel >= 1, "--parallel", "must be >= 1")
    config = os.path.relpath(CONFIG)
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    points, _ = sweep.build_points(config, args.workdir)
    parallel = args.parallel or max(1, min(len(points), os.cpu_count() or 1))
    print(
        f"quickstart: {len(points)} runs ({', '.join(p.name for p in points)}) of "
        f"{config}, {parallel} at once; logs in {args.workdir}/<run>/sweep.log",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        status = sweep.run_sweep(config, args.workdir, parallel=parallel)
    except KeyboardInterrupt:
        print(
            "quickstart: interrupted; ./launch.sh again resumes where it stopped", file=sys.stderr
        )
        return 130
    trained = time.perf_counter() - t0
    try:
        report = compare.compare([args.workdir], args.out)
    except compare.CompareError as e:
        print(f"quickstart: no report: {e}", file=sys.stderr)
        return 1
    print()
    print(report["table"])
    for task, row in compare.best_per_task(report["rows"]).items():
        if row is None:
            print(f"best on {task} beyond the training length: none (all rows tie)")
            continue
        print(
            f"best on {task} beyond the training length: {row.label} "
            f"({row.metric} {compare.fmt(row.metric, row.ood_mean)} %)"
        )
    first = sorted(Path(args.workdir).glob("pe=alibi*"))
    example = first[0] if first else Path(args.workdir) / "<run>"
    print(
        f"""
quickstart: finished in {time.perf_counter() - t0:.0f} s ({trained:.0f} s training and
evaluating {len(points)} runs, {parallel} at once).
  table:        {args.out}/table.md (and table.csv)
  length plot:  {args.out}/length_curves.png
  runs:         {args.workdir}/<run>/ (config.json, metrics.jsonl, results.json, checkpoints)

next:
  attention maps of one run at length 32:
    ./launch.sh compare {args.workdir} --out {args.out} --attention '{example}' --length 32
  a reduced paper reproduction (about 10 min on 2 cores; see RESULTS.md):
    ./launch.sh sweep --config configs/deletang.py:mini=true --workdir runs/deletang_mini \\
        --parallel 2 && ./launch.sh compare runs/deletang_mini --out reports/deletang_mini
  one run of your own:
    ./launch.sh train --config configs/formal.py:task=reverse_string,pe=rope --workdir runs/mine
  the tests:
    ./launch.sh test"""
    )
    failed = status.get("failed", [])
    if failed:
        print(f"quickstart: {len(failed)} runs failed ({', '.join(failed)}); see their sweep.log")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
