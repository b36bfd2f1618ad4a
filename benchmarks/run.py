"""Run every layerlr benchmark and write a Markdown table + JSON: one command.

    python -m benchmarks.run            # full: TF, TF+XLA, JAX, torch (~10-15 min on 2 CPU cores)
    python -m benchmarks.run --quick    # one backend (KERAS_BACKEND, default TF), ~2 min
    python -m benchmarks.run --backends jax torch --models tfm_pv
    python -m benchmarks.run --updates  # what UpdateLogger costs in model.fit, per backend

Each backend configuration runs in its own subprocess (KERAS_BACKEND is fixed
per process), one after the other so they never compete for the machine.
Within a process every contender trains the same model from the same initial
weights, interleaved in random order round after round. Results go to
``benchmarks/results/`` as ``latest.{md,json}`` plus a dated copy. The same
command runs unchanged on a GPU machine: the backends pick their default device.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402

CONFIGS = {  # name -> (KERAS_BACKEND, jit_compile flag)
    "tensorflow": ("tensorflow", False),
    "tensorflow-xla": ("tensorflow", True),
    "jax": ("jax", False),  # always jitted
    "torch": ("torch", False),  # eager, as model.fit runs it by default
}
MODELS = ["conv", "tfm10", "tfm_pv", "embed"]
CONTENDERS = ["plain", "layerlr", "multi", "split", "gradscale", "torch_native"]  # the last: torch only
FULL = dict(rounds=20, steps=2, opt_steps=4, compile_rounds=2, resolve_repeats=3)
QUICK = dict(rounds=3, steps=3, opt_steps=5, compile_rounds=1, resolve_repeats=1)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{mem_text}, {platform.platform()}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def thread_env(threads: int, xla_flags: str) -> dict:
    """Environment capping every backend's CPU thread pools at ``threads``."""
    flags = f"intra_op_parallelism_threads={threads}"
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false " + flags
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TF_NUM_INTRAOP_THREADS": n,
            "TF_NUM_INTEROP_THREADS": n, "XLA_FLAGS": (xla_flags + " " + flags).strip()}


# `layerlr ARGS` as the console script runs it, reporting on stderr's last line
# which backends got imported.
CLI_CHILD = """
import json, sys
from layerlr_cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]),
      file=sys.stderr)
"""


def cli_startup(repeats: int = 3) -> dict:
    """Wall seconds of ``layerlr --help`` / ``--version`` in a fresh interpreter (median).

    Also what else they did: which backends they imported and how many lines
    they wrote to stderr (TensorFlow logs some on import unless told not to,
    so TF_CPP_MIN_LOG_LEVEL is left out of their environment).
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    out = {}
    for flag in ("--help", "--version"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CLI_CHILD, flag], env=env,
                                  capture_output=True, text=True, timeout=300)
            times.append(time.perf_counter() - start)
        lines = proc.stderr.splitlines()
        try:
            backends = json.loads(lines.pop())
        except (IndexError, ValueError):  # it failed before reporting
            backends = [f"(exit status {proc.returncode}: unknown)"]
        out[flag] = {"seconds": sorted(times)[len(times) // 2], "runs_s": times,
                     "backends_imported": backends, "stderr_lines": len(lines)}
    return out


def run_config(name: str, settings: dict, args, resolve: bool) -> dict:
    backend, jit = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks._worker", "--out", str(out),
               "--config", name, "--models", *args.models,
               "--contenders", *args.contenders, "--seed", str(args.seed),
               "--rounds", str(settings["rounds"]), "--steps", str(settings["steps"]),
               "--opt-steps", str(settings["opt_steps"]),
               "--compile-rounds", str(settings["compile_rounds"]),
               "--resolve-repeats", str(settings["resolve_repeats"] if resolve else 0),
               "--resolve-variables", str(args.resolve_variables),
               "--resolve-rules", str(args.resolve_rules)]
        if jit:
            cmd.append("--jit-compile")
        if not args.control:
            cmd.append("--no-control")
        if args.tiny:
            cmd.append("--tiny")
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if args.threads:
            env.update(thread_env(args.threads, env.get("XLA_FLAGS", "")))
        print(f"== {name}: KERAS_BACKEND={backend} {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        tail = collections.deque(maxlen=100)
        try:
            for line in proc.stderr:  # progress as it happens; the rest kept for errors
                tail.append(line)
                if line.startswith(f"[{name}]"):
                    print("   " + line.rstrip(), file=sys.stderr, flush=True)
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.time() - start
        if proc.returncode != 0 or not out.exists():
            why = (f"timed out after {args.timeout} s" if seconds >= args.timeout
                   else f"exit code {proc.returncode}")
            return {"config": name, "backend": backend, "error": why + "\n" + "".join(tail)[-4000:]}
        print(f"   done in {seconds:.0f} s", file=sys.stderr, flush=True)
        return json.loads(out.read_text())


def run_updates(configs, args, settings) -> int:
    """The UpdateLogger section: fit time with / without it, one process per backend."""
    results = []
    for name in configs:
        backend, jit = CONFIGS[name]
        if jit:
            continue  # model.fit's compile setting does not change what the callback does
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "updates.json"
            cmd = [sys.executable, "-m", "benchmarks.update_logger", "--out", str(out),
                   "--rounds", str(args.update_rounds or (3 if args.quick else 10)),
                   "--steps", str(args.update_steps), "--every", str(args.update_every),
                   "--seed", str(args.seed)] + (["--tiny"] if args.tiny else [])
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            if args.threads:
                env.update(thread_env(args.threads, env.get("XLA_FLAGS", "")))
            print(f"== UpdateLogger cost on {name}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            if proc.returncode != 0 or not out.exists():
                results.append({"backend": backend, "error": proc.stderr[-3000:]})
                print(f"   failed: {proc.stderr[-800:]}", file=sys.stderr)
                continue
            results.append(json.loads(out.read_text()))
            print("   " + proc.stdout.strip(), file=sys.stderr, flush=True)
    from benchmarks import update_logger

    lines = ["# UpdateLogger: model.fit time with / without it", "",
             f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine()}", f"- threads: {args.threads or 'backend default'}", ""]
    lines += ["- " + (update_logger.line(r) if "error" not in r else f"{r['backend']}: FAILED")
              for r in results]
    text = "\n".join(lines) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "updates_latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.output_dir / "updates_latest.md").write_text(text)
    print(text)
    return 1 if any("error" in r for r in results) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark LayerwiseOptimizer against the plain optimizer, Keras' "
                    "MultiOptimizer, a split variable list and gradient scaling.")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds, one first-call round, and only the current backend "
                        "(KERAS_BACKEND, default tensorflow) unless --backends is given")
    p.add_argument("--backends", nargs="+", choices=[*CONFIGS, "all"], default=None,
                   help="backend configurations to run (default: all; with --quick: the current one)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    for key in FULL:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    p.add_argument("--resolve-variables", type=int, default=10_000)
    p.add_argument("--resolve-rules", type=int, default=100)
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the A/A slot (the plain step timed twice) that shows the noise floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="cap the backends' CPU threads (default: their own choice); 1 "
                        "steadies timings on a machine shared with other jobs")
    p.add_argument("--tiny", action="store_true",
                   help="same models and groups with small tensors (for the smoke test; "
                        "the timings mean nothing)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per backend process")
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--note", default="", help="free text stored with the results "
                   "(e.g. 'shared machine, other jobs running')")
    p.add_argument("--strict", action="store_true", help="exit with 1 when a target FAILs")
    p.add_argument("--updates", action="store_true",
                   help="only the UpdateLogger section: model.fit time with and without "
                        "layerlr.callbacks.UpdateLogger, side by side, per backend")
    p.add_argument("--update-every", type=int, default=100, help="UpdateLogger(every=...) (default 100)")
    p.add_argument("--update-steps", type=int, default=300, help="steps per timed fit (default 300)")
    p.add_argument("--update-rounds", type=int, default=None, help="default 10 (3 with --quick)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the Markdown next to a results JSON (no measuring)")
    args = p.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(_report.markdown(result))
        print(_report.markdown_summary(result))
        return 0
    if "plain" not in args.contenders:
        p.error("--contenders must include plain: every ratio is against it")

    settings = dict(QUICK if args.quick else FULL)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.backends is None or "all" in args.backends:
        current = os.environ.get("KERAS_BACKEND", "tensorflow")
        if args.quick and args.backends is None:
            configs = [current if current in CONFIGS else "tensorflow"]
        else:
            configs = list(CONFIGS)
    else:
        configs = list(dict.fromkeys(args.backends))
    if args.updates:
        return run_updates(configs, args, settings)
    # Resolution is backend-independent Python: measure it once, where creating
    # 10,000 variables is cheapest (TF variables are slow to create).
    resolve_in = next((c for c in configs if CONFIGS[c][0] != "tensorflow"), configs[0])

    started = _dt.datetime.now(_dt.timezone.utc)
    results = [run_config(c, settings, args, resolve=c == resolve_in) for c in configs]
    print("== layerlr --help / --version startup", file=sys.stderr, flush=True)
    cli = cli_startup()
    versions = {"python": platform.python_version()}
    for r in results:
        versions.update(r.get("versions", {}))
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python -m benchmarks.run" + (" " + shlex.join(given) if given else "")
    result = {
        "meta": {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "machine": machine(),
            "git_commit": git_commit(),
            "versions": versions,
            "note": args.note,
            "tiny": args.tiny,
            "threads": args.threads,
            "settings": settings,
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()),
        },
        "configs": results,
        "cli_startup": cli,
    }
    result["targets"] = _report.targets(result)
    text = _report.markdown(result)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for name in (stamp, "latest"):
        (args.output_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.output_dir / f"{name}.md").write_text(text)
    print(_report.markdown_targets(result))
    print("\n" + _report.markdown_summary(result))
    print(f"\nwrote {args.output_dir / 'latest.md'} and {args.output_dir / 'latest.json'} "
          f"(copies: {stamp}.md/.json) in {result['meta']['seconds']} s")
    failed_workers = any("error" in r for r in results)
    failed_targets = any(t["verdict"] == "FAIL" for t in result["targets"])
    return 1 if failed_workers or (args.strict and failed_targets) else 0


if __name__ == "__main__":
    sys.exit(main())
