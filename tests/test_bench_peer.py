"""experiments/bench_peer.py without torch: argument errors, the install failure line, the
ratio and tables on given numbers, the JSON-lines protocol against a fake peer process, and
one tiny interleaved run (attn at smoke size, a fake peer) checking that both sides get the
same sequence of lengths. The real peer (peer_xtransformers.py) needs torch, so it is only
checked not to import jax or the project."""

import ast
import json
import os
import stat
import sys
import textwrap
import types
from pathlib import Path

import jax
import pytest

from experiments import bench, bench_peer

ROOT = Path(__file__).resolve().parents[1]

FAKE_PEER = """
import json, sys, time
log = open(sys.argv[1], "a") if len(sys.argv) > 1 else None
for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg["cmd"]
    if cmd == "quit":
        break
    if cmd == "die":
        sys.exit(3)
    if cmd == "slow":
        time.sleep(30)
    print("a library's stray line", flush=True)
    if cmd == "info":
        out = {"ok": True, "torch": "0", "x_transformers": "0", "cxx": "/bin/true"}
    elif cmd == "build":
        out = {"ok": True, "params": 7}
    elif cmd == "steps":
        if log:
            log.write(json.dumps([msg["mode"], msg["lengths"]]) + "\\n"); log.flush()
        out = {"ok": True, "seconds": 0.001 * len(msg["lengths"]), "loss": 0.0, "graphs": 0}
    else:
        out = {"ok": False, "error": "ValueError: unknown cmd " + repr(cmd)}
    print(json.dumps(out), flush=True)
"""


def _exit_line(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        bench_peer.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return exc.value.code, err[0]


@pytest.fixture
def no_env(monkeypatch):
    """Argument errors must come before the peer's environment is touched."""

    def fail(*a, **k):
        raise AssertionError("ensure_env called")

    monkeypatch.setattr(bench_peer, "ensure_env", fail)


@pytest.mark.parametrize(
    "argv, flag, names",
    [
        (["--vs", "pytorch"], "--vs", ["x-transformers"]),
        (["--vs", "x-transformers", "--workload", "long"], "--workload", ["w1-mixed", "w2"]),
        (["--vs", "x-transformers", "--variants", "kerple"], "--variants", ["rope", "t5"]),
        (["--vs", "x-transformers", "--dtype", "float16"], "--dtype", ["float32", "bfloat16"]),
        (["--vs", "x-transformers", "--peer-malloc", "tc"], "--peer-malloc", ["same", "system"]),
    ],
)
def test_argument_errors_are_one_line(capsys, no_env, argv, flag, names):
    code, line = _exit_line(capsys, argv)
    assert code == 2
    assert line.startswith(f"bench: error: {flag}:"), line
    assert all(name in line for name in names), line


def test_peer_system_malloc_drops_only_the_jemalloc_preload():
    env = {"LD_PRELOAD": "/x/libjemalloc.so.2:/y/libfoo.so", "MALLOC_CONF": "thp:always", "A": "1"}
    assert bench_peer.peer_system_malloc(env) == {"LD_PRELOAD": "/y/libfoo.so", "A": "1"}
    assert bench_peer.peer_system_malloc({"LD_PRELOAD": "/x/libjemalloc.so.2"}) == {}
    assert bench.malloc_name(env) == "jemalloc" and bench.malloc_name({}) == "glibc"


def test_bfloat16_reaches_both_sides():
    """--dtype bfloat16: attn's model computes in bfloat16 (parameters stay float32) and the
    peer's build request asks for torch's bf16 autocast."""
    side = bench_peer.AttnSide("w1", "rope", True, dtype="bfloat16")
    assert side.config.model.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(side.state["params"])} == {"float32"}
    assert bench_peer.build_request(side, "w1", "rope")["dtype"] == "bfloat16"
    fp32 = bench_peer.AttnSide("w2", "alibi", True)
    assert bench_peer.build_request(fp32, "w2", "alibi")["dtype"] == "float32"


def test_plain_bench_has_no_peer_workloads(capsys):
    """w1-mixed exists only beside a peer (bench_peer.py, which launch.sh runs for --vs)."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--workload", "w1-mixed"])
    assert exc.value.code == 2
    assert "invalid choice: 'w1-mixed'" in capsys.readouterr().err


def _fake_python(tmp_path, fail_on: str, message: str) -> str:
    """A stand-in interpreter: `-m venv DIR` makes DIR/bin/python (itself); it fails with
    `message` when its arguments contain `fail_on`, else succeeds silently."""
    script = tmp_path / "fakepython"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in *{fail_on}*) echo "some progress"; echo "{message}" >&2; exit 1;; esac
        if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
            mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
        fi
        exit 0
        """)
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_install_failures_are_one_line(tmp_path):
    py = _fake_python(tmp_path, "venv", "Error: no venv module")
    with pytest.raises(bench_peer.PeerError) as exc:
        bench_peer.ensure_env("x-transformers", root=str(tmp_path), python=py)
    assert str(exc.value) == (
        "bench --vs x-transformers: creating the virtual environment failed: Error: no venv module"
    )
    torch = bench_peer.PEERS["x-transformers"]["torch"]
    root = tmp_path / "b"
    py = _fake_python(tmp_path, "--no-deps", f"ERROR: No matching distribution found for {torch}")
    with pytest.raises(bench_peer.PeerError) as exc:
        bench_peer.ensure_env("x-transformers", root=str(root), python=py)
    msg = str(exc.value)
    assert msg.startswith(f"bench --vs x-transformers: pip install {torch} failed: ERROR: No"), msg
    assert "PIP_FIND_LINKS" in msg and "\n" not in msg
    assert not (root / ".peer" / "x-transformers" / "pins.txt").exists()
    # Everything succeeds: the stamp is written and the next call does nothing.
    py = _fake_python(tmp_path, "never-matches", "")
    got = bench_peer.ensure_env("x-transformers", root=str(root), python=py)
    assert got == str(root / ".peer" / "x-transformers" / "bin" / "python")
    os.remove(got)
    with pytest.raises(bench_peer.PeerError, match="is missing"):
        bench_peer.ensure_env("x-transformers", root=str(root), python="/bin/true")


def test_install_failure_exits_before_jax_work(capsys, monkeypatch):
    def fail(peer):
        raise bench_peer.PeerError(f"bench --vs {peer}: pip install torch failed: boom")

    monkeypatch.setattr(bench_peer, "ensure_env", fail)
    with pytest.raises(SystemExit) as exc:
        bench_peer.main(["--vs", "x-transformers", "--smoke"])
    assert exc.value.code == "bench --vs x-transformers: pip install torch failed: boom"
    assert '"peak"' not in capsys.readouterr().out


def test_ratio_and_tables_on_given_numbers():
    res = {"workload": "w1", "encoding": "rope", "attn": [10.0, 12.0, 11.0]}
    res.update(eager=[5.0, 6.0, 5.0], compile=[8.0, 6.0, 7.0], attn_params=1000, peer_params=900)
    res.update(attn_T=[48], peer_T=[41], attn_warmup_s=3.0, eager_warmup_s=0.5)
    s = bench_peer.summarize(res)
    assert (s["attn"], s["eager"], s["compile"], s["best"]) == (11.0, 5.0, 7.0, "compile")
    assert s["ratio"] == pytest.approx(11.0 / 7.0)  # rounds: 10/8, 12/6, 11/7 -> median 11/7
    rows = bench_peer.table([res], "x-transformers").splitlines()
    assert rows[0].startswith("| workload | encoding | attn steps/s | x-transformers eager |")
    assert rows[2] == "| w1 | rope | 11 | 5 | 7 | 1.57x (compile) |"
    slow = {**res, "attn": [1.0, 1.0, 1.0], "compile": None}
    assert (
        bench_peer.table([slow], "p").splitlines()[2] == "| w1 | rope | 1 | 5 | – | 0.20x (eager) |"
    )
    alone = {**res, "eager": None, "compile": None, "peer_params": None}
    assert bench_peer.table([alone], "p").splitlines()[2].endswith("| – | – | – |")
    mixed = {**res, "workload": "w2", "flops": 2e9, "peer_T": list(range(2, 42))}
    mixed.update(compile_graphs=2, compile_late_graphs=1)
    line = bench_peer.details([mixed], peak=100.0).splitlines()[2]
    # MFU: 11 steps/s x 2 GFLOP = 22 GFLOP/s of a 100 GFLOP/s peak.
    assert line == (
        "| w2 | rope | 1,000 / 900 | 3.0 / 0.5 / – | 48 / 2..41 (40) | 2 (1) | "
        "22.0% / 10.0% / 14.0% |"
    )


def test_schedule_is_seeded_and_in_range():
    a = bench_peer.schedule(0, 3, 50, 1, 40)
    assert a == bench_peer.schedule(0, 3, 50, 1, 40)
    assert a != bench_peer.schedule(1, 3, 50, 1, 40)
    assert [len(r) for r in a] == [50, 50, 50] and a[0] != a[1]
    assert {n for r in a for n in r} <= set(range(1, 41)) and {1, 40} <= {n for r in a for n in r}
    assert bench_peer.schedule(0, 2, 3, 40, 40) == [[40] * 3] * 2
    assert bench_peer.first_seen([[3, 1, 3], [2, 1]]) == [3, 1, 2]


def _fake_peer(tmp_path, log=None):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    return bench_peer.PeerProcess([sys.executable, str(script), *([str(log)] if log else [])])


def test_protocol_against_a_fake_peer(tmp_path):
    peer = _fake_peer(tmp_path)
    try:
        assert peer.request({"cmd": "info"})["cxx"] == "/bin/true"  # stray line skipped
        assert (
            peer.request({"cmd": "steps", "mode": "eager", "lengths": [3, 4]})["seconds"] == 0.002
        )
        with pytest.raises(bench_peer.PeerError, match="peer: ValueError: unknown cmd 'bogus'"):
            peer.request({"cmd": "bogus"})
        assert peer.request({"cmd": "build"})["params"] == 7  # still serving after an error
        with pytest.raises(bench_peer.PeerError, match="no answer to 'slow' in 0s"):
            peer.request({"cmd": "slow"}, timeout=0.3)
    finally:
        peer.proc.kill()
        peer.close()
    peer = _fake_peer(tmp_path)
    with pytest.raises(bench_peer.PeerError, match="peer exited with status 3"):
        peer.request({"cmd": "die"})
    peer.close()


def test_interleaved_rounds_share_one_length_sequence(tmp_path, monkeypatch):
    """w1-mixed at smoke size: attn and both peer modes step through the same n per round
    (the peer unpadded: parity_check reads n symbols and one answer slot, T = n + 1)."""
    seen = []
    steps = bench_peer.AttnSide.steps

    def record(self, ns):
        seen.append(list(ns))
        return steps(self, ns)

    monkeypatch.setattr(bench_peer.AttnSide, "steps", record)
    log = tmp_path / "peer_log.jsonl"
    peer = _fake_peer(tmp_path, log)
    report = bench.Report(out=open(os.devnull, "w"))
    ctx = types.SimpleNamespace(smoke=True, report=report, name="vs-fake", peer="fake")
    try:
        res = bench_peer.measure(ctx, peer, "w1-mixed", "rope", ["eager", "compile"], 3, 4)
    finally:
        peer.close()
    plan = bench_peer.schedule(0, 3, 4, 1, 6)
    assert seen == plan
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    warm = [n + 1 for n in bench_peer.first_seen(plan)]
    assert calls[:2] == [["eager", warm], ["compile", warm]]
    rounds = [lengths for _, lengths in calls[2:]]
    assert rounds == [[n + 1 for n in r] for r in plan for _ in range(2)]
    # The order rotates: attn, eager, compile; then eager, compile, attn; compile, attn, eager.
    assert [m for m, _ in calls[2:]] == ["eager", "compile"] * 2 + ["compile", "eager"]
    assert len(res["attn"]) == len(res["eager"]) == len(res["compile"]) == 3
    # smoke trains n <= 6: every batch is cut at the longest training length, 7 (not 16)
    assert res["attn_T"] == [7] and res["peer_T"] == sorted(set(warm))


def test_peer_script_imports_neither_jax_nor_the_project():
    tree = ast.parse((ROOT / "experiments" / "peer_xtransformers.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert "torch" in names and "x_transformers" in names
    assert not names & {"jax", "jaxlib", "flax", "optax", "attn", "experiments", "configs"}
