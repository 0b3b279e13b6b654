"""Bad input to every tool is one line naming what is wrong, a non-zero exit status and no
traceback, before anything is compiled or written: the command-line tools in-process
(sweep, compare, generate, bench, multi, quickstart), the entry point and launch.sh as
subprocesses. (tests/test_reliability.py holds the entry point's earlier 20 cases.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import algorithmic, formal
from experiments import bench, compare, generate, multi, quickstart, sweep, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained decoder (generate can sample from it) and a trained encoder (it cannot)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, config in (
        ("decoder", algorithmic.get_config("smoke=true")),
        ("encoder", formal.get_config("smoke=true")),
    ):
        config.train.steps, config.eval.lengths = 2, "4"
        config.eval.compilation_cache = ""
        train.run(config, str(root / name))
    return root


def one_line(capsys, status, expected_status, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == expected_status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def exit_status(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


SWEEP_CASES = [
    (["--parallel", "0"], "--parallel: must be >= 1"),
    (["--parallel", "-2"], "--parallel: must be >= 1"),
    (["--timeout", "0"], "--timeout: seconds, > 0"),
    (["--only", "("], "--only: '(' is not a regular expression"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("extra, needle", SWEEP_CASES)
def test_sweep_flags(tmp_path, capsys, extra, needle):
    argv = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path / "s"), *extra]
    one_line(capsys, exit_status(sweep.main, argv), 2, needle)


@pytest.mark.parametrize(
    "config, needle",
    [
        ("configs/missing.py", "--config: no such file 'configs/missing.py'"),
        ("configs/formal.py", "defines no get_sweep(); it is not a sweep"),
    ],
)
def test_sweep_config_files(tmp_path, capsys, config, needle):
    argv = ["--config", config, "--workdir", str(tmp_path / "s")]
    one_line(capsys, exit_status(sweep.main, argv), 2, needle)


def test_sweep_only_matching_nothing(tmp_path, capsys):
    argv = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path / "s")]
    one_line(capsys, exit_status(sweep.main, [*argv, "--only", "zzz"]), 2, "matches no point")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--length", "0", "--attention", "x"], "--length: must be >= 1"),
        (["--metric", "bogus"], "--metric: no run reports 'bogus'"),
        (["--eval", "missing"], "no run directories (with evals/missing.json)"),
    ],
)
def test_compare_flags(runs, tmp_path, capsys, extra, needle):
    argv = [str(runs), "--out", str(tmp_path / "r"), *extra]
    one_line(capsys, exit_status(compare.main, argv), 2, needle)


def test_compare_out_under_a_file_and_maps_of_a_non_run(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [str(runs), "--out", str(blocker / "r")]
    one_line(capsys, exit_status(compare.main, argv), 2, f"--out: {blocker / 'r'} cannot be")
    argv = [str(runs), "--out", str(tmp_path / "r"), "--attention", str(tmp_path), "--length", "4"]
    one_line(capsys, exit_status(compare.main, argv), 2, "is not a run directory")


def test_compare_with_nothing_to_compare(tmp_path, capsys):
    argv = [str(tmp_path), "--out", str(tmp_path / "r")]
    one_line(capsys, exit_status(compare.main, argv), 2, "no run directories")


GENERATE_FLAGS = [
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--top_p", "0"], "--top_p: must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p: must be in (0, 1]"),
    (["--top_k", "-1"], "--top_k: must be >= 0"),
    (["--top_k", "100000"], "--top_k: at most"),
    (["--max_new_tokens", "0"], "--max_new_tokens: must be >= 1"),
    (["--prompt", ""], "--prompt: must not be empty"),
    (["--prompt", "1,2"], "--prompt: '1,2'; task 'copy' takes symbol indices"),
    (["--prompt", "99"], "--prompt: '99'; task 'copy' takes symbol indices"),
]


@pytest.mark.parametrize("extra, needle", GENERATE_FLAGS)
def test_generate_flags(runs, capsys, extra, needle):
    argv = ["--workdir", str(runs / "decoder"), "--prompt", "1 2", *extra]
    one_line(capsys, exit_status(generate.main, argv), 2, needle)


def test_generate_workdirs(runs, tmp_path, capsys):
    argv = ["--prompt", "1 2", "--workdir"]
    one_line(capsys, exit_status(generate.main, [*argv, str(tmp_path)]), 2, "not a run directory")
    encoder = exit_status(generate.main, [*argv, str(runs / "encoder")])
    one_line(capsys, encoder, 2, "model 'encoder' (encoder layout) cannot generate")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model": ')
    one_line(capsys, exit_status(generate.main, [*argv, str(broken)]), 2, "not a readable config")
    coupled = tmp_path / "coupled"
    coupled.mkdir()
    config = json.loads((runs / "decoder" / "config.json").read_text())
    config["task"]["positions"] = "coupled"
    (coupled / "config.json").write_text(json.dumps(config))
    status = exit_status(generate.main, [*argv, str(coupled)])
    one_line(capsys, status, 2, "task supplies its own position ids (task.positions='coupled')")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--repeats", "0"], "--repeats: must be >= 1"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--workload", "bogus"], "argument --workload: invalid choice: 'bogus'"),
    ],
)
def test_bench_flags(capsys, argv, needle):
    one_line(capsys, exit_status(bench.main, argv), 2, needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--num_processes", "0"], "--num_processes: must be >= 1"),
        (["--num_processes", "2", "--devices_per_process", "0"], "--devices_per_process"),
        (["--num_processes", "2", "--port", "70000"], "--port: 0 (a free one) or a TCP port"),
    ],
)
def test_multi_flags(capsys, argv, needle):
    one_line(capsys, exit_status(multi.main, argv), 2, needle)


def test_quickstart_flags(capsys):
    one_line(capsys, exit_status(quickstart.main, ["--parallel", "0"]), 2, "--parallel: must be")


def _main(*argv):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


MAIN_TRAIN_CASES = [
    ("--config.seed=-1", "seed: must be >= 0, got -1"),
    ("--config.model.d_model=0", "model.d_model: must be positive, got 0"),
    ("--config.model.num_layers=0", "model.num_layers: must be positive, got 0"),
    ("--config.eval.num_examples=0", "eval.num_examples: must be positive, got 0"),
    ("--config.eval.batch_size=0", "eval.batch_size: must be positive"),
    ("--lengths=0", "--lengths: 0 <= 0"),
]


@pytest.mark.parametrize("flag, needle", MAIN_TRAIN_CASES)
def test_entry_point_train_inputs(tmp_path, flag, needle):
    proc = _main("--config=configs/formal.py:smoke=true", f"--workdir={tmp_path / 'w'}", flag)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == f"error: {needle}" or needle in lines[-1], lines[-1]
    assert not (tmp_path / "w" / "config.json").exists()


def test_entry_point_memory_estimate(tmp_path):
    proc = _main(
        "--config=configs/formal.py:smoke=true",
        f"--workdir={tmp_path / 'w'}",
        "--config.model.impl=reference",
        "--lengths=40960",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.impl: evaluating at length 40960 (batch 8) with impl")
    assert "GiB of attention logits; this machine has" in last


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--step=-1"], "--step: -1 < 0"),
        (["--name=final"], "--name: 'final'"),
        (["--config.train.steps=5"], "config.train.steps: not an evaluation-time field"),
        (["--config=configs/formal.py"], "--config: eval reads the run's config.json"),
    ],
)
def test_entry_point_eval_inputs(runs, extra, needle):
    proc = _main("--mode=eval", f"--workdir={runs / 'encoder'}", *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, status, needle",
    [
        (["bogus"], 2, "launch.sh: unknown mode 'bogus'"),
        (["multi"], 2, "usage: ./launch.sh multi N train|eval ARGS..."),
    ],
)
def test_launch_sh(argv, status, needle):
    proc = subprocess.run(
        ["bash", str(REPO / "launch.sh"), *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == status and needle in proc.stderr.strip(), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_results_json_that_is_not_json_is_named(runs, tmp_path, capsys):
    bad = tmp_path / "bad_run"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps(["not", "a", "dict"]))
    assert compare.main([str(bad), str(runs), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"compare: skipped {bad / 'results.json'}: not a readable results file" in err
