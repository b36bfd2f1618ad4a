"""The benchmark harness runs end to end and its correctness columns are right.

One minimal run of ``python -m benchmarks.run`` on the current backend (tiny
models, one round) in a subprocess, as a user would run it; then checks of the
files it writes. No timing is asserted: timings belong to the benchmark's own
PASS/FAIL table. What is asserted is what must hold on any machine: the
contenders that implement per-layer rates correctly (layerlr, a split variable
list) end on the same weights as Keras' MultiOptimizer with one optimizer per
group, and gradient scaling does not (Adam/AdamW normalise the gradient away).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKEND

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _report, _resolve_bench, _worker  # noqa: E402

MODELS = ["conv", "embed"]  # AdamW with decay groups; Adam on an embedding (sparse grads on TF)
CONTENDERS = ["plain", "layerlr", "multi", "split", "gradscale"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--backends", BACKEND,
        "--models", *MODELS, "--tiny", "--rounds", "2", "--steps", "1",
        "--opt-steps", "1", "--compile-rounds", "1", "--resolve-repeats", "1",
        "--resolve-variables", "1000", "--resolve-rules", "30",
        "--output-dir", str(out), "--note", "smoke test", "--threads", "1",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_writes_json_and_markdown_with_machine_versions_backend_and_date(run):
    out, stdout = run
    result = json.loads((out / "latest.json").read_text())
    meta = result["meta"]
    assert meta["date"].endswith("UTC") and meta["machine"] and meta["note"] == "smoke test"
    assert meta["threads"] == 1 and meta["tiny"] is True
    assert meta["versions"]["keras"] and meta["versions"]["layerlr"]
    assert {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[BACKEND] in meta["versions"]
    (config,) = result["configs"]
    assert config["backend"] == BACKEND and config["devices"]
    # A dated copy next to latest, identical.
    dated = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(dated) == 1 and json.loads(dated[0].read_text()) == result

    markdown = (out / "latest.md").read_text()
    assert markdown == (out / dated[0].with_suffix(".md").name).read_text()
    for text in ("## Targets", f"## {BACKEND}", "keras", "layerlr.LayerwiseOptimizer",
                 "MultiOptimizer", "incorrect for adaptive optimizers", "A/A control"):
        assert text in markdown
    assert "| target | backend | model | measured | verdict |" in stdout


def test_every_model_and_contender_was_measured(run):
    out, _ = run
    (config,) = json.loads((out / "latest.json").read_text())["configs"]
    assert [m["name"] for m in config["models"]] == MODELS
    for model in config["models"]:
        # PyTorch's own AdamW with param groups competes on torch only.
        native = {"torch_native"} if BACKEND == "torch" else set()
        assert set(model["contenders"]) == set(CONTENDERS) | {"plain_aa"} | native
        for key, c in model["contenders"].items():
            for field in ("full_step_ms", "opt_step_ms"):
                assert math.isfinite(c[field]) and c[field] > 0, (model["name"], key, field)
            if key != "plain_aa":
                assert c["first_call_s"] > 0
            assert c["full_step_ratio"]["n"] == 2
        assert model["contenders"]["plain"]["full_step_ratio"]["median"] == 1.0
        # One optimizer per group for the two multi-optimizer contenders.
        assert model["contenders"]["multi"]["n_optimizers"] == model["n_groups"]
        assert model["contenders"]["split"]["n_optimizers"] == model["n_groups"]
        assert model["contenders"]["layerlr"]["n_optimizers"] == 1


def test_correct_contenders_agree_with_one_optimizer_per_group(run):
    out, _ = run
    (config,) = json.loads((out / "latest.json").read_text())["configs"]
    for model in config["models"]:
        c = model["contenders"]
        for key in ("layerlr", "split"):
            assert c[key]["agrees_with_reference"] is True, (model["name"], key)
            assert c[key]["error_vs_reference"] <= 1e-3
        # Plain has no per-layer rates to check.
        assert c["plain"]["error_vs_reference"] is None


def test_gradient_scaling_is_flagged_incorrect(run):
    out, _ = run
    result = json.loads((out / "latest.json").read_text())
    for model in result["configs"][0]["models"]:
        gradscale = model["contenders"]["gradscale"]
        assert gradscale["agrees_with_reference"] is False
        # The smallest multiplier is 0.1 (embed) or 0.01 (conv): Adam moves
        # those variables ~1/mult times too far.
        assert gradscale["error_vs_reference"] > 3
        assert gradscale["note"] == "incorrect for adaptive optimizers"
    assert "**WRONG**" in (out / "latest.md").read_text()


def test_memory_is_the_plain_optimizers(run):
    out, _ = run
    (config,) = json.loads((out / "latest.json").read_text())["configs"]
    int_bytes = 8 if BACKEND == "tensorflow" else 4  # iterations: int64 on TF
    for model in config["models"]:
        c = model["contenders"]
        # layerlr keeps no optimizer state of its own (its variables are the plain optimizer's).
        assert c["layerlr"]["optimizer_bytes_vs_plain"] == 0
        assert c["gradscale"]["optimizer_bytes_vs_plain"] == 0
        # One (iterations, learning_rate) pair per extra optimizer.
        assert c["split"]["optimizer_bytes_vs_plain"] == (model["n_groups"] - 1) * (int_bytes + 4)


def test_resolution_figure_is_recorded(run):
    out, stdout = run
    (config,) = json.loads((out / "latest.json").read_text())["configs"]
    res = config["rule_resolution"]
    assert res["variables"] == 1000 and res["lr_rules"] == 30
    assert 0 < res["variables_matching_no_lr_rule"] < 1000
    assert res["resolve_s"] > 0
    # One figure per selector kind, each with a verdict of its own.
    assert list(res["kinds"]) == list(_resolve_bench.KINDS)
    for kind, figure in res["kinds"].items():
        assert figure["lr_rules"] == 30 and figure["resolve_s"] > 0, kind
        assert 0 < figure["variables_matching_no_lr_rule"] < figure["variables"], kind
        assert f"rules, {figure['label']} < 0.5 s" in stdout
    assert res["kinds"]["paths"]["resolve_s"] == res["resolve_s"]


def test_command_line_startup_is_recorded(run):
    out, stdout = run
    cli = json.loads((out / "latest.json").read_text())["cli_startup"]
    assert set(cli) == {"--help", "--version"}
    for flag, figure in cli.items():
        assert len(figure["runs_s"]) == 3 and figure["seconds"] in figure["runs_s"]
        # What must hold on any machine; the time is the table's business.
        assert figure["backends_imported"] == [] and figure["stderr_lines"] == 0, flag
        assert f"| layerlr {flag} < 1 s, no backend import | - | - |" in stdout
    assert "Command line: `layerlr --help`" in (out / "latest.md").read_text()


def test_resolution_benchmark_runs_alone(tmp_path, capsys):
    figures = tmp_path / "resolution.json"
    assert _resolve_bench.main(["--variables", "1000", "--rules", "30", "--repeats", "1",
                                "--kinds", "blocks", "types", "--json", str(figures)]) == 0
    out = capsys.readouterr().out
    result = json.loads(figures.read_text())
    assert list(result["kinds"]) == ["blocks", "types"]
    blocks = result["kinds"]["blocks"]
    # 500 Dense layers in 40 blocks (13 or 12 each); 1 rule in 5 is a whole
    # block (the first 6), the others layers inside those blocks.
    assert blocks["variables"] == 1000 and blocks["lr_rules"] == 30
    assert blocks["variables_matching_no_lr_rule"] == 2 * (500 - 6 * 13)
    # Layer k is of type k % 60; the rules select the first 30 types.
    types = result["kinds"]["types"]
    assert types["variables_matching_no_lr_rule"] == 2 * sum(k % 60 >= 30 for k in range(500))
    for kind in ("Sequential blocks", "layer types"):
        assert next(line for line in out.splitlines() if kind in line).endswith(("PASS |", "FAIL |"))


def test_render_rewrites_the_markdown_from_the_json(run, tmp_path, capsys):
    from benchmarks import run as bench_run

    out, _ = run
    copy = tmp_path / "copy.json"
    copy.write_text((out / "latest.json").read_text())
    assert bench_run.main(["--render", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == (out / "latest.md").read_text()
    assert "| backend | model (groups) |" in capsys.readouterr().out


# --- the statistics and the verdicts, on hand-made numbers --------------------


def test_paired_ratios_are_per_round_with_quartiles():
    ratio = _worker.paired([2.0, 3.0, 4.0, 10.0, None], [1.0, 3.0, 2.0, 10.0, 1.0])
    # Rounds: 2.0, 1.0, 2.0, 1.0 (the round without a value is dropped).
    assert ratio == {"median": 1.5, "q25": 1.0, "q75": 2.0, "min": 1.0, "max": 2.0, "n": 4}
    assert _worker.paired([], []) is None


def test_relative_error_is_measured_in_intended_moves():
    import numpy as np

    initial = [np.zeros(3), np.ones(2)]
    reference = [np.array([0.0, 0.5, -1.0]), np.ones(2)]  # moves 1.0; second never moves
    assert _worker._relative_error(reference, reference, initial) == 0.0
    off = [np.array([0.0, 0.5, -0.75]), np.ones(2)]
    assert _worker._relative_error(off, reference, initial) == 0.25
    moved_frozen = [reference[0], np.array([1.0, 1.5])]
    assert _worker._relative_error(moved_frozen, reference, initial) == math.inf


def _result(layerlr_full, layerlr_opt, layerlr_first, multi_opt, bytes_conv, bytes_tfm, resolve_s,
            backend="tensorflow"):
    def ratio(m):
        return {"median": m, "q25": m, "q75": m, "min": m, "max": m, "n": 3}

    def model(name, groups, nbytes, pairs):
        return {"name": name, "n_groups": groups, "pairs": pairs, "contenders": {
            "plain": {},
            "layerlr": {"full_step_ratio": ratio(layerlr_full), "opt_step_ratio": ratio(layerlr_opt),
                        "first_call_ratio": ratio(layerlr_first), "optimizer_bytes_vs_plain": nbytes},
        }}

    pairs = {"layerlr_vs_multi": {"opt_step": ratio(multi_opt), "first_call": ratio(0.5)}}
    return {"configs": [{
        "config": backend, "backend": backend, "jit_compile": False,
        "models": [model("conv", 4, bytes_conv, {}), model("tfm_pv", 54, bytes_tfm, pairs)],
        "rule_resolution": {"variables": 10_000, "lr_rules": 100, "resolve_s": resolve_s,
                            "build_s": resolve_s},
    }]}


def _with_kinds(result, **resolve_s):
    result["configs"][0]["rule_resolution"]["kinds"] = {
        kind: {"label": _resolve_bench.KINDS[kind], "variables": 10_000, "lr_rules": 100,
               "resolve_s": s, "build_s": s} for kind, s in resolve_s.items()}
    return result


def _verdicts(result):
    return {(r["target"].split(" <")[0].split(" =")[0], r["model"].split(" ")[0]): r["verdict"]
            for r in _report.targets(result)}


def test_targets_pass_at_the_limits_and_fail_beyond():
    ok = _verdicts(_result(1.02, 1.05, 1.10, 0.9, 12, 12, 0.49))
    assert set(ok.values()) == {"PASS"} and len(ok) == 10
    bad = _verdicts(_result(1.03, 1.06, 1.11, 1.01, 12, 12, 1.5))
    assert bad[("full step", "conv")] == bad[("optimizer step", "tfm_pv")] == "FAIL"
    assert bad[("compile", "conv")] == bad[("resolve 10,000 variables x 100 rules", "-")] == "FAIL"
    assert bad[("optimizer step faster than MultiOptimizer", "tfm_pv")] == "FAIL"
    assert bad[("compile faster than MultiOptimizer", "tfm_pv")] == "PASS"  # 0.5 in both
    assert bad[("optimizer memory", "all")] == "PASS"


def test_resolution_has_a_verdict_per_selector_kind():
    result = _with_kinds(_result(1.0, 1.0, 1.0, 0.9, 12, 12, 0.1), paths=0.1, layers=0.49, blocks=0.5)
    verdicts = _verdicts(result)
    prefix = "resolve 10,000 variables x 100 rules, "
    assert verdicts[(prefix + "globs, regexes, a tuple of globs", "-")] == "PASS"
    assert verdicts[(prefix + "layer objects", "-")] == "PASS"
    assert verdicts[(prefix + "Sequential blocks (+ layers inside them)", "-")] == "FAIL"
    assert ("resolve 10,000 variables x 100 rules", "-") not in verdicts  # no kind-less row
    summary = _report.markdown_summary({"configs": result["configs"]})
    assert "layer objects 0.49 s PASS; Sequential blocks (+ layers inside them) 0.50 s FAIL." in summary


def test_command_line_target_fails_when_slow_importing_a_backend_or_logging():
    def figure(seconds, backends=(), stderr_lines=0):
        return {"seconds": seconds, "runs_s": [seconds], "backends_imported": list(backends),
                "stderr_lines": stderr_lines}

    result = _result(1.0, 1.0, 1.0, 0.9, 12, 12, 0.1)
    for cli, verdict in (({"--help": figure(0.99)}, "PASS"), ({"--help": figure(1.0)}, "FAIL"),
                         ({"--help": figure(0.2, ["keras", "tensorflow"])}, "FAIL"),
                         ({"--help": figure(0.2, stderr_lines=2)}, "FAIL")):
        result["cli_startup"] = cli
        assert _verdicts(result)[("layerlr --help", "-")] == verdict, cli
    assert "keras, tensorflow imported" in _report.markdown_summary(
        dict(result, cli_startup={"--version": figure(0.2, ["keras", "tensorflow"])}))


def test_memory_target_fails_when_the_extra_bytes_grow_with_the_model():
    verdicts = _verdicts(_result(1.0, 1.0, 1.0, 0.9, 12, 12 * 54, 0.5))
    assert verdicts[("optimizer memory", "all")] == "FAIL"


def test_eager_torch_has_no_compile_verdict():
    verdicts = _verdicts(_result(1.0, 1.0, 5.0, 0.9, 8, 8, 0.5, backend="torch"))
    assert verdicts[("compile", "conv")] == "n/a"
    assert verdicts[("compile faster than MultiOptimizer", "tfm_pv")] == "n/a"


def test_update_logger_section_measures_fit_with_and_without_the_logger():
    from benchmarks import update_logger

    result = update_logger.measure(rounds=2, steps=6, every=3, tiny=True)
    # Steps 0 and 3 of the 6 are measured; no timing is asserted, only that
    # every figure is there and means what it says.
    assert result["measured_steps_per_fit"] == 2 and result["rounds"] == 2
    assert result["backend"] == BACKEND
    for key in ("ratio", "control", "inside_fraction"):
        assert result[key]["n"] == 2 and result[key]["q25"] <= result[key]["median"] <= result[key]["q75"]
    assert 0 < result["inside_fraction"]["median"] < 1
    assert result["verdict"] in ("PASS", "FAIL")
    assert "time inside UpdateLogger(every=3)" in update_logger.line(result)
