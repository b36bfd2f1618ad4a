"""Targets (PASS/FAIL) and the Markdown tables, from the workers' JSON.

The targets are the issue's, checked on LayerwiseOptimizer ("layerlr") against
the plain optimizer on the same model, same process, same rounds:
- full training step <= 1.02x plain; optimizer step only <= 1.05x plain;
- first call (trace + compile) <= 1.10x plain (not applicable to eager torch);
- optimizer memory = plain + a constant (the same few bytes for every model);
- rule resolution for 10,000 variables x 100 rules < 0.5 s, for every selector kind;
- ``layerlr --help`` and ``--version`` < 1 s, importing no backend, writing
  nothing to stderr;
- with one group per variable (~50 groups): faster optimizer step and faster
  first call than Keras' MultiOptimizer.
Verdicts use the median of the paired per-round ratios; the spread next to it
says how far to trust a verdict on a noisy machine.
"""

from __future__ import annotations

FULL_STEP_MAX = 1.02
OPT_STEP_MAX = 1.05
FIRST_CALL_MAX = 1.10
RESOLVE_MAX_S = 0.5
CLI_MAX_S = 1.0
MEMORY_CONSTANT_MAX = 64  # bytes: a scalar or two, never per variable
MANY_GROUPS_MODEL = "tfm_pv"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def fmt_ratio(r: dict | None) -> str:
    if not r:
        return "-"
    if r["n"] == 1:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} [{r['q25']:.2f}-{r['q75']:.2f}]"


def _compiled(config: dict) -> bool:
    return config["backend"] != "torch" or config.get("jit_compile", False)


def targets(result: dict) -> list[dict]:
    """One row per checked target: what, where, the measured value, PASS/FAIL."""
    rows = []
    for config in result["configs"]:
        if "error" in config:
            rows.append(dict(target="worker ran", config=config["config"], model="-",
                             measured=config["error"].splitlines()[-1][:80], verdict="FAIL"))
            continue
        deltas = {}
        for model in config["models"]:
            c = model["contenders"].get("layerlr")
            if c is None or "plain" not in model["contenders"]:
                continue
            where = dict(config=config["config"], model=f"{model['name']} ({model['n_groups']} groups)")
            for target, key, limit in (
                (f"full step <= {FULL_STEP_MAX}x plain", "full_step_ratio", FULL_STEP_MAX),
                (f"optimizer step <= {OPT_STEP_MAX}x plain", "opt_step_ratio", OPT_STEP_MAX),
                (f"compile <= {FIRST_CALL_MAX}x plain", "first_call_ratio", FIRST_CALL_MAX),
            ):
                ratio = c[key]
                ok = None if ratio is None else ratio["median"] <= limit
                measured = fmt_ratio(ratio)
                if key == "first_call_ratio" and not _compiled(config):
                    ok, measured = None, measured + " (eager: nothing compiled)"
                rows.append(dict(target=target, measured=measured, verdict=_verdict(ok), **where))
            deltas[model["name"]] = c["optimizer_bytes_vs_plain"]
            pair = model.get("pairs", {}).get("layerlr_vs_multi")
            if model["name"] == MANY_GROUPS_MODEL and pair:
                for target, key in (("optimizer step faster than MultiOptimizer", "opt_step"),
                                    ("compile faster than MultiOptimizer", "first_call")):
                    ratio = pair[key]
                    ok = None if ratio is None else ratio["median"] < 1.0
                    if key == "first_call" and not _compiled(config):
                        ok = None
                    rows.append(dict(target=target, measured=f"layerlr/Multi {fmt_ratio(ratio)}",
                                     verdict=_verdict(ok), **where))
            native = model.get("pairs", {}).get("layerlr_vs_torch_native")
            if model["name"] == MANY_GROUPS_MODEL and native:
                ratio = native["opt_step"]
                rows.append(dict(target="optimizer step faster than torch.optim.AdamW(foreach)",
                                 measured=f"layerlr/torch {fmt_ratio(ratio)}",
                                 verdict=_verdict(None if ratio is None else ratio["median"] < 1.0),
                                 **where))
        if deltas:
            values = set(deltas.values())
            ok = len(values) == 1 and 0 <= next(iter(values)) <= MEMORY_CONSTANT_MAX
            shown = ", ".join(f"{k} +{v} B" for k, v in deltas.items())
            rows.append(dict(target="optimizer memory = plain + constant",
                             config=config["config"], model="all", measured=shown,
                             verdict=_verdict(ok)))
        for res in _resolution_rows(config):
            kind = f", {res['label']}" if "label" in res else ""
            rows.append(dict(
                target=f"resolve {res['variables']:,} variables x {res['lr_rules']} rules{kind} "
                       f"< {RESOLVE_MAX_S:g} s",
                config=config["config"], model="-",
                measured=f"{res['resolve_s']:.2f} s (build: {res['build_s']:.2f} s)",
                verdict=_verdict(res["resolve_s"] < RESOLVE_MAX_S)))
    for flag, cli in (result.get("cli_startup") or {}).items():
        rows.append(dict(target=f"layerlr {flag} < {CLI_MAX_S:g} s, no backend import",
                         config="-", model="-", measured=_cli_measured(cli),
                         verdict=_verdict(_cli_ok(cli))))
    return rows


def _cli_ok(cli: dict) -> bool:
    return cli["seconds"] < CLI_MAX_S and not cli["backends_imported"] and not cli["stderr_lines"]


def _cli_measured(cli: dict) -> str:
    imported = ", ".join(cli["backends_imported"]) or "no backend"
    return f"{cli['seconds']:.2f} s, {imported} imported, {cli['stderr_lines']} stderr lines"


def _resolution_rows(config: dict) -> list[dict]:
    """One figure per selector kind; results from before the kinds: one figure."""
    res = config.get("rule_resolution")
    if not res:
        return []
    return list(res["kinds"].values()) if "kinds" in res else [res]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _weights_cell(c: dict) -> str:
    if c["error_vs_reference"] is None:
        return "-"
    err = c["error_vs_reference"]
    text = "identical" if err == 0.0 else f"{err:.1e} of a step"
    if not c["agrees_with_reference"]:
        text = f"**WRONG** (off by {err:.2g}x the intended move)"
    return text


def config_table(config: dict) -> str:
    rows = []
    for model in config["models"]:
        for key, c in model["contenders"].items():
            label = c["label"] + (f" ({c['note']})" if c.get("note") else "")
            rows.append([
                f"{model['name']}", label, c["n_optimizers"],
                f"{c['full_step_ms']:.2f}", fmt_ratio(c["full_step_ratio"]),
                f"{c['opt_step_ms']:.3f}", fmt_ratio(c["opt_step_ratio"]),
                "-" if c["first_call_s"] is None else f"{c['first_call_s']:.2f}",
                fmt_ratio(c["first_call_ratio"]),
                f"{c['optimizer_bytes']:,} ({c['optimizer_bytes_vs_plain']:+,})",
                _weights_cell(c),
            ])
    header = ["model", "contender", "optimizers", "full step ms", "vs plain",
              "opt step ms", "vs plain", "first call s", "vs plain",
              "optimizer bytes (vs plain)", "weights vs MultiOptimizer"]
    return _table(header, rows)


def _cell(ratio: dict | None, limit: float | None, applicable: bool = True) -> str:
    if not ratio:
        return "-"
    text = fmt_ratio(ratio)
    if limit is None or not applicable:
        return text
    return f"{text} {_verdict(ratio['median'] <= limit)}"


def markdown_summary(result: dict) -> str:
    """layerlr against plain, one row per backend x model, verdicts inline."""
    rows = []
    for config in result["configs"]:
        if "error" in config:
            rows.append([config["config"], "-", "worker failed", "", "", "", "", ""])
            continue
        deltas = {m["contenders"]["layerlr"]["optimizer_bytes_vs_plain"]
                  for m in config["models"] if "layerlr" in m["contenders"]}
        memory_ok = len(deltas) == 1 and 0 <= next(iter(deltas)) <= MEMORY_CONSTANT_MAX
        for model in config["models"]:
            c = model["contenders"].get("layerlr")
            if c is None or "plain" not in model["contenders"]:
                continue
            aa = model["contenders"].get("plain_aa")
            noise = "-" if aa is None else (
                f"{fmt_ratio(aa['full_step_ratio'])} / {fmt_ratio(aa['opt_step_ratio'])}")
            pair = model.get("pairs", {}).get("layerlr_vs_multi") or {}
            vs_multi = "-"
            if model["name"] == MANY_GROUPS_MODEL and pair:
                opt, first = pair.get("opt_step"), pair.get("first_call")
                vs_multi = (f"step {fmt_ratio(opt)} {_verdict(opt and opt['median'] < 1.0)}; "
                            f"compile {fmt_ratio(first)}"
                            + (f" {_verdict(first and first['median'] < 1.0)}"
                               if _compiled(config) else " (eager)"))
            rows.append([
                config["config"], f"{model['name']} ({model['n_groups']})",
                _cell(c["full_step_ratio"], FULL_STEP_MAX),
                _cell(c["opt_step_ratio"], OPT_STEP_MAX),
                _cell(c["first_call_ratio"], FIRST_CALL_MAX, _compiled(config))
                + ("" if _compiled(config) else " (eager)"),
                f"+{c['optimizer_bytes_vs_plain']} B {_verdict(memory_ok)}",
                vs_multi,
                noise,
            ])
    header = ["backend", "model (groups)", f"full step (<= {FULL_STEP_MAX})",
              f"optimizer step (<= {OPT_STEP_MAX})", f"first call (<= {FIRST_CALL_MAX})",
              "optimizer memory (plain + constant)", "layerlr / MultiOptimizer (< 1)",
              "A/A noise (full / optimizer step)"]
    out = _table(header, rows)
    for config in result["configs"]:
        figures = _resolution_rows(config)
        if figures:
            res = figures[0]
            out += (f"\n\nRule resolution, {res['variables']:,} variables x {res['lr_rules']} "
                    f"rules (< {RESOLVE_MAX_S:g} s): "
                    + "; ".join(f"{r['label'] + ' ' if 'label' in r else ''}{r['resolve_s']:.2f} s "
                                f"{_verdict(r['resolve_s'] < RESOLVE_MAX_S)}" for r in figures)
                    + ".")
    cli = result.get("cli_startup")
    if cli:
        out += ("\n\nCommand line: " + "; ".join(
            f"`layerlr {flag}` {_cli_measured(c)} {_verdict(_cli_ok(c))}" for flag, c in cli.items())
            + f" (< {CLI_MAX_S:g} s, no backend, no stderr).")
    return out


def markdown_targets(result: dict) -> str:
    rows = result.get("targets") or targets(result)
    return _table(["target", "backend", "model", "measured", "verdict"],
                  [[r["target"], r["config"], r["model"], r["measured"], r["verdict"]]
                   for r in rows])


def markdown(result: dict) -> str:
    meta = result["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    out = [
        "# layerlr benchmarks",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- versions: {versions}",
    ]
    if meta.get("note"):
        out.append(f"- note: {meta['note']}")
    if meta.get("threads"):
        out.append(f"- CPU threads per backend capped at {meta['threads']} (--threads)")
    if meta.get("tiny"):
        out.append("- **--tiny models: a functional check, the timings mean nothing**")
    out += ["", "Ratios are medians of per-round paired ratios, [interquartile range] "
            "over rounds; `plain again (A/A control)` times the plain step twice per round and "
            "shows the noise floor.", "",
            "## Summary: LayerwiseOptimizer vs the plain optimizer", "",
            markdown_summary(result), "", "## Targets", "", markdown_targets(result)]
    for config in result["configs"]:
        out += ["", f"## {config['config']}", ""]
        if "error" in config:
            out += ["Worker failed:", "", "```", config["error"][-2000:], "```"]
            continue
        s = config["settings"]
        out.append(
            f"devices: {', '.join(config['devices'])}; jit_compile: {config['jit_compile']}; "
            f"{s['rounds']} rounds x ({s['steps']} full + {s['opt_steps']} optimizer steps), "
            f"{s['compile_rounds']} first-call round(s); load average "
            f"{config['load_average_start'][0]:.1f} -> {config['load_average_end'][0]:.1f}; "
            f"{config['seconds']:.0f} s")
        out.append("")
        for model in config["models"]:
            out.append(f"- **{model['name']}**: {model['title']}; {model['n_variables']} "
                       f"variables, {model['n_params']:,} parameters")
        out += ["", config_table(config)]
    return "\n".join(out) + "\n"
