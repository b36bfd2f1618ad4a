"""Starting, bounding and always stopping the worker processes of the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _scenarios as sc

WORKER = Path(__file__).with_name("_dist_worker.py")


def free_ports(n: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (all held open until all are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("TF_CONFIG", "XLA_FLAGS"):
        env.pop(key, None)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def start(job: dict, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    try:
        # A new session, so stopping a worker stops whatever it started too.
        return subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(job)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        out.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_all(jobs_envs: list[tuple[dict, dict]], timeout: float):
    """Runs the workers side by side; returns [(weights, facts)] in order.

    Every worker is killed as soon as one fails or the time runs out, so a
    worker blocked in a collective cannot outlive the test.
    """
    procs = []
    deadline = time.monotonic() + timeout
    try:
        for job, env in jobs_envs:
            procs.append((start(job, env, _log(job)), job))
        while True:
            codes = [proc.poll() for proc, _ in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                raise AssertionError(
                    f"worker {i} ({procs[i][1]['mode']}) exited with {code}; log:\n"
                    f"{_tail(_log(procs[i][1]))}"
                )
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- worker {i}:\n{_tail(_log(job), 2000)}" for i, (_, job) in enumerate(procs)
                )
                raise AssertionError(f"workers did not finish within {timeout} s\n{logs}")
            time.sleep(0.1)
    finally:
        for proc, _ in procs:
            stop(proc)
    results = []
    for _, job in procs:
        with open(job["out"] + ".json") as f:
            results.append((sc.load_weights(job["out"]), json.load(f)))
    return results


def run_one(job: dict, env: dict, timeout: float):
    return run_all([(job, env)], timeout)[0]


def _log(job: dict) -> Path:
    return Path(job["out"] + ".log")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError as error:
        return f"<no log: {error}>"
