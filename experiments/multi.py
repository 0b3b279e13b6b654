"""N local processes of experiments.main: the multi-host code path on one machine.

  python -m experiments.multi --num_processes 2 --mode train -- \
      --config configs/formal.py:smoke=true --workdir runs/mp2
  ./launch.sh multi 2 train --config ... --workdir ...          (the same)

Each child is `python -m experiments.main --mode MODE ARGS` with JAX_COORDINATOR_ADDRESS
(localhost, a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, so experiments.main calls
jax.distributed.initialize; each process sees --devices_per_process CPU devices (default 1)
and feeds its own rows of every global batch (jax.make_array_from_process_local_data).
Process 0 writes the logs; checkpoints are written by all processes together (orbax).

The parent forwards SIGINT/SIGTERM to the children, and if one child fails it stops the
others; its exit status is the first non-zero child status (0 if all succeed).
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

KILL_AFTER_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{port}"
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    return env


def main(argv=None) -> int:
    from experiments.config_utils import ArgumentParser

    parser = ArgumentParser(prog="multi", description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then experiments.main flags")
    a = parser.parse_args(argv)
    parser.check(a.num_processes >= 1, "--num_processes", "must be >= 1")
    parser.check(a.devices_per_process >= 1, "--devices_per_process", "must be >= 1")
    parser.check(0 <= a.port <= 65535, "--port", "0 (a free one) or a TCP port up to 65535")
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    port = a.port or _free_port()
    cmd = [sys.executable, "-m", "experiments.main", "--mode", a.mode, *args]
    children = [
        subprocess.Popen(cmd, env=child_env(i, a.num_processes, port, a.devices_per_process))
        for i in range(a.num_processes)
    ]

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    status, deadline = 0, None
    while any(c.poll() is None for c in children):
        failed = [c.returncode for c in children if c.returncode not in (None, 0)]
        if failed and not status:
            # The survivors would block in their next collective: stop them, then kill them.
            status, deadline = _status(failed[0]), time.monotonic() + KILL_AFTER_S
            for c in children:
                if c.poll() is None:
                    c.terminate()
        if deadline is not None and time.monotonic() > deadline:
            for c in children:
                if c.poll() is None:
                    c.kill()
        time.sleep(0.1)
    return status or next((_status(c.returncode) for c in children if c.returncode), 0)


def _status(returncode: int) -> int:
    """A child killed by signal s reports -s; a shell reports 128 + s."""
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
