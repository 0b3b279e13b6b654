"""Reproduce a paper: its sweep, the comparison and its claims checked, in one command.

    ./launch.sh reproduce NAME [--mini] [--parallel N]
    ./launch.sh reproduce --results        # RESULTS.md (and results/*.png) from the reports

NAME is a reproduction config: press (configs/press_lm.py), kazemnejad, deletang, and the
frontier ones that define claims. The command runs the config's grid with experiments.sweep
(resumable: re-running skips what is DONE) into runs/reproduce/NAME[_mini], compares it into
reports/NAME[_mini] (table.md, table.csv, length_curves.png; with the config's
`CLAIMS_GRID = True` also grid.md and grid_heatmaps.png of the 2-D operand-length evaluation,
compare --grid; `CLAIMS_METRIC` names the table's metric, or a tuple whose first is the table's
and whose others claims may check too), evaluates the config's
`get_claims(arg)` (experiments/claims.py) on the comparison and prints each claim with its
measured figure and "holds" or "does not hold"; reports/NAME[_mini]/claims.md and claims.json
keep them with the command, date, machine and commit. A claim that does not hold is a
result, not an error: the exit status is 0 and the summary line says how many held.

`--results` rewrites RESULTS.md from every reports/*/claims.json (each with its table, claims,
command, date, machine and commit), copies each report's plots to results/, and appends
results/measurements.md (earlier hand-written measurements that are not claims).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments import compare, sweep
from experiments.config_utils import ArgumentParser
from experiments.workdir import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"press": "press_lm"}  # names whose config file is called otherwise


def config_path(name: str) -> Path:
    return ROOT / "configs" / f"{CONFIGS.get(name, name)}.py"


def reproducible_names() -> list[str]:
    """Config files that define both a grid and claims."""
    names = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        text = path.read_text()
        if "def get_claims" in text and "def get_sweep" in text:
            names.append(next((k for k, v in CONFIGS.items() if v == path.stem), path.stem))
    return names


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def claims_markdown(record: dict) -> str:
    lines = [
        f"## {record['name']}{' (mini)' if record['mini'] else ''}: "
        f"{record['held']} of {record['total']} claims hold\n",
        f"`{record['command']}`, {record['date']}, {record['machine']}, commit "
        f"{record['commit']}, {record['seconds'] / 60:.1f} min.\n",
        "| claim | measured | holds | paper |",
        "|---|---|---|---|",
    ]
    for c in record["claims"]:
        mark = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
        lines.append(f"| {c['claim']} | {c['detail']} | {mark} | {c['paper']} |")
    return "\n".join(lines) + "\n"


def reproduce(name: str, *, mini: bool, parallel: int) -> dict:
    path = config_path(name)
    if not path.exists():
        raise sweep.SweepError(
            f"NAME: no reproduction {name!r}; reproductions: {', '.join(reproducible_names())}"
        )
    module = sweep.load_config_module(str(path))
    if not hasattr(module, "get_claims"):
        raise sweep.SweepError(f"NAME: {path.name} states no claims (get_claims)")
    arg = "mini=true" if mini else None
    spec = os.path.relpath(path) + (f":{arg}" if arg else "")
    tag = f"{name}_mini" if mini else name
    workdir, out = ROOT / "runs" / "reproduce" / tag, ROOT / "reports" / tag
    command = f"./launch.sh reproduce {name}{' --mini' if mini else ''} --parallel {parallel}"
    t0 = time.time()
    status = sweep.run_sweep(spec, workdir, parallel=parallel)
    if status.get("stopped"):
        return {"stopped": status["stopped"]}
    metrics = getattr(module, "CLAIMS_METRIC", None)
    metrics = (metrics,) if metrics is None or isinstance(metrics, str) else tuple(metrics)
    pool = getattr(module, "CLAIMS_POOL", ())
    report = compare.compare(
        [workdir], out, metric=metrics[0], pool=pool, grid=getattr(module, "CLAIMS_GRID", False)
    )
    rows = list(report["rows"])
    if len(metrics) > 1:  # claims on further metrics: their rows too (the table shows the first)
        runs, _ = compare.load_all([workdir])
        rows += [r for m in metrics[1:] for r in compare.summarize(runs, m, pool)]
    claims = [c.evaluate(rows) for c in module.get_claims(arg)]
    held = sum(c["holds"] is True for c in claims)
    record = {
        "name": name,
        "mini": mini,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "commit": commit(),
        "seconds": time.time() - t0,
        "runs": report["runs"],
        "failed": status.get("failed", []),
        "claims": claims,
        "held": held,
        "total": len(claims),
    }
    atomic_write_json(out / "claims.json", record)
    atomic_write_text(out / "claims.md", claims_markdown(record))
    for c in claims:
        mark = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
        print(f"[{mark}] {c['claim']}: {c['detail']} (paper: {c['paper']})")
    print(f"reproduce {tag}: {held} of {len(claims)} claims hold; {out / 'claims.md'}")
    return record


def write_results() -> Path:
    """RESULTS.md from every reports/*/claims.json; its plots copied to results/<name>_*.png."""
    records = []
    for path in sorted((ROOT / "reports").glob("*/claims.json")):
        records.append((path.parent, json.loads(path.read_text())))
    parts = [
        "# Results: reproductions checked against their papers' claims\n",
        "Generated by `./launch.sh reproduce --results` from `reports/*/claims.json`; each "
        "section says the command that produced it, when, on which machine and at which "
        "commit. A mini protocol is far smaller than the paper's (minutes on 2 CPU cores), "
        "so a claim that does not hold in a mini is a finding about that size, not about "
        "the paper. Tables are compare's `table.md`.\n",
    ]
    (ROOT / "results").mkdir(exist_ok=True)
    for folder, record in records:
        parts.append(claims_markdown(record))
        parts.append((folder / "table.md").read_text())
        if (folder / "grid.md").exists():
            parts.append((folder / "grid.md").read_text())
        for plot in ("length_curves.png", "grid_heatmaps.png"):
            if (folder / plot).exists():
                target = ROOT / "results" / f"{folder.name}_{plot}"
                shutil.copyfile(folder / plot, target)
                parts.append(f"![{folder.name} {plot[:-4]}](results/{target.name})\n")
    notes = ROOT / "results" / "measurements.md"
    if notes.exists():
        parts.append(notes.read_text())
    out = ROOT / "RESULTS.md"
    atomic_write_text(out, "\n".join(parts))
    return out


def main(argv=None) -> int:
    parser = ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="press, kazemnejad, deletang, ...")
    parser.add_argument("--mini", action="store_true", help="the reduced protocol (CPU)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--results", action="store_true", help="rewrite RESULTS.md")
    args = parser.parse_args(argv)
    parser.check(args.parallel >= 1, "--parallel", "must be >= 1")
    if args.results:
        print(f"wrote {write_results()}")
        return 0
    parser.check(bool(args.name), "NAME", f"one of {', '.join(reproducible_names())}")
    try:
        record = reproduce(args.name, mini=args.mini, parallel=args.parallel)
    except (sweep.SweepError, compare.CompareError) as e:
        print(f"reproduce: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 128 + 15 if record.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
