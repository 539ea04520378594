"""Parity reports: ``report.json``, ``report.md`` and a self-contained ``report.html``.

The input is the result dict built by :mod:`parity.run` (schema below); every writer
is a pure function of it, so the reports can be regenerated from ``report.json``.

Result schema (keys the writers read; all optional except ``checks``)::

    config:      the resolved ExperimentConfig as a dict
    versions:    {library: version}
    hardware:    {field: value}
    setup:       {field: text}          # e.g. how many JAX devices, world size, steps
    forward:     {pair: {max_abs, max_rel, mean_kl}}
    series:      {label: {side, precision, zero_stage, step: [...], loss: [...],
                          grad_norm: [...], lr: [...], batch_fingerprint: [...]}}
    pairs:       [{name, precision, test, ref, loss_abs_diff: [...],
                   floor_name, floor_abs_diff: [...],   # the stage-to-stage distance
                   grad: {param: {rel_err, noise, limit, margin, cosine}},
                   update: {param: {rel_err, noise, limit, margin}}}]
    throughput:  {label: {tokens_per_s, tokens_per_s_total, step_time_s, mfu,
                          peak_memory_bytes, compile_s | startup_s, num_devices, device_kind}}
    checks:      [{name, value, limit, op, passed, key, detail, noise, margin}]
                 # noise: the reference's own distance the limit came from (or null);
                 # margin: value/limit (limit/value for ">="), <= 1 passes
    diagnosis:   {headline?, failing, info: [...], ...}  # headline: where it went wrong
    info:        [{name, value, note}]   # reported figures that have no limit
    errors:      [text]                  # phases that failed; any error fails the run
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmspec.io import atomic_write_json, atomic_write_text

# under the throughput table when trainers ran concurrently (parity run --jobs > 1)
CONCURRENT_NOTE = ("These runs trained {jobs} at a time on a shared CPU: their throughput "
                   "and start-up figures are not a speed comparison. `parity bench` runs "
                   "one trainer at a time and compares speed.")


def all_passed(result: Mapping[str, Any]) -> bool:
    """True only if there is at least one check, every check passed and no phase failed."""
    checks = result.get("checks") or []
    return bool(checks) and all(c["passed"] for c in checks) and not result.get("errors")


def exit_code(result: Mapping[str, Any]) -> int:
    """0 when :func:`all_passed`, else 1."""
    return 0 if all_passed(result) else 1


def failing_checks(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in result.get("checks") or [] if not c["passed"]]


def fmt(v: Any) -> str:
    """Compact number formatting for tables."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.6g}"


def _detail(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(v)
    if isinstance(v, (dict, list)):
        return json.dumps(_json_safe(v))
    return str(v)


def _mib(b: Any) -> str:
    return "-" if b is None else f"{float(b) / 2**20:.1f} MiB"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype"):
        return _json_safe(obj.item())
    return obj


# ----------------------------------------------------------------------------- markdown


def _noise_text(c: Mapping[str, Any]) -> str:
    """The noise the check's limit came from (the reference's own distance)."""
    n = c.get("noise")
    if n is None:
        n = (c.get("detail") or {}).get("floor")
    return "-" if n is None else fmt(n)


def _margin_text(c: Mapping[str, Any]) -> str:
    m = c.get("margin")
    return "-" if m is None else fmt(m)


def checks_table_md(checks: list[Mapping[str, Any]]) -> str:
    lines = ["| check | value | limit | noise | margin | result |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c['name']} | {fmt(c['value'])} | {c.get('op', '<=')} {fmt(c['limit'])} | "
            f"{_noise_text(c)} | {_margin_text(c)} | {'pass' if c['passed'] else '**FAIL**'} |"
        )
    return "\n".join(lines)


def headline(result: Mapping[str, Any]) -> str | None:
    """The diagnosis headline (where the port went wrong), when there is one."""
    return (result.get("diagnosis") or {}).get("headline")


# what to look at next, by the kind of check that failed (first match wins)
NEXT_STEPS = (
    ("forward:", "The forward pass differs before any training: compare the models layer by "
     "layer (the bf16 activations probe and the diagnosis name the first layer that "
     "differs); check weight names, transposes, RoPE and the attention mask."),
    ("loss function", "The loss on identical logits differs: look at the loss's precision "
     "(log-softmax, token mean) in the JAX trainer's loss function."),
    ("accumulation", "Gradient accumulation differs: check the accumulator's dtype (fp32 like "
     "DeepSpeed's grad_accum_dtype) and how micro-batch gradients are summed."),
    ("grad vs float64", "The step-0 gradient is off: the per-parameter margin plot names the "
     "tensors; a few tensors point at their layer, all of them at the loss or the batch."),
    ("first update", "The first AdamW update differs while gradients agree: check epsilon, "
     "bias correction, weight-decay mask, clipping and the learning-rate schedule."),
    ("loss at step 0", "The step-0 loss differs: check the batch (fingerprints), the loss's "
     "token mean and the forward precision."),
    ("loss curve", "Step 0 agrees but the curves drift apart: compare lr per step (reported "
     "figures), the optimizer state, data order after step 0 and precision policy."),
    ("really bf16", "The JAX bf16 run is not as far from float64 as bf16 is: it probably "
     "computes in fp32; check the compute dtype of the JAX bf16 run."),
    ("fingerprint", "The two sides trained on different batches: run `parity data CONFIG "
     "--steps N` and compare each trainer's batch order (data.seed, sharding of rows)."),
)


def next_steps(result: Mapping[str, Any]) -> list[str]:
    """What to look at next when the report fails: the diagnosis, each failing check's
    kind (:data:`NEXT_STEPS`), and the logs of failed runs."""
    out = []
    if headline(result):
        out.append(f"Start with the diagnosis: {headline(result)}.")
    seen = set()
    for c in failing_checks(result):
        for key, text in NEXT_STEPS:
            if key in c["name"] and key not in seen:
                seen.add(key)
                out.append(f"{c['name']}: {text}")
                break
    for label, r in (result.get("runs") or {}).items():
        if r.get("error"):
            out.append(f"{label} did not finish: read its train.log ({r.get('out_dir')}).")
    if result.get("errors") and not out:
        out.append("A phase failed: the errors above say which; rerun after fixing it.")
    return out


def run_links(result: Mapping[str, Any], base: Path | None) -> list[tuple[str, str, str]]:
    """(run, relative link to train.log, relative link to metrics.jsonl) per run, from
    the report's folder ``base``."""
    out = []
    for label, r in (result.get("runs") or {}).items():
        d = r.get("out_dir")
        if not d:
            continue
        rel = os.path.relpath(d, base) if base is not None else d
        out.append((label, f"{rel}/train.log", f"{rel}/metrics.jsonl"))
    return out


def render_markdown(result: Mapping[str, Any], base: Path | None = None) -> str:
    """The summary a reader pastes into an issue."""
    checks = result.get("checks") or []
    ok = all_passed(result)
    name = (result.get("config") or {}).get("name", "?")
    n_fail = len(failing_checks(result))
    out = [f"**Diagnosis: {headline(result)}**", ""] if headline(result) else []
    out += [
        f"## Parity report: `{name}` - {'PASS' if ok else 'FAIL'}",
        "",
        f"{len(checks)} checks, {n_fail} failed"
        + (f", {len(result['errors'])} phase error(s)" if result.get("errors") else "") + ".",
        "",
        checks_table_md(checks),
    ]
    if result.get("errors"):
        out += ["", "### Errors", ""] + [f"- {e}" for e in result["errors"]]
    steps = [] if ok else next_steps(result)
    if steps:
        out += ["", "### What to look at next", ""] + [f"- {t}" for t in steps]
    links = run_links(result, base)
    if links:
        out += ["", "### Runs", "", "| run | log | metrics |", "|---|---|---|"]
        out += [f"| {label} | [train.log]({log}) | [metrics.jsonl]({met}) |"
                for label, log, met in links]
    info = result.get("info") or []
    if info:
        out += ["", "### Reported figures (no limit)", "", "| figure | value | note |",
                "|---|---|---|"]
        out += [f"| {i['name']} | {fmt(i['value'])} | {i.get('note', '')} |" for i in info]
    tp = result.get("throughput") or {}
    if tp:
        out += ["", "### Throughput (warm-up steps excluded)", ""]
        if (result.get("concurrent_jobs") or 1) > 1:
            out += [CONCURRENT_NOTE.format(jobs=result["concurrent_jobs"]), ""]
        out += [_throughput_md(tp)]
    setup = result.get("setup") or {}
    if setup:
        out += ["", "### Set-up", ""] + [f"- {k}: {v}" for k, v in setup.items()]
    versions = result.get("versions") or {}
    if versions:
        out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    hw = result.get("hardware") or {}
    if hw:
        out += ["", "Hardware: " + ", ".join(f"{k}: {v}" for k, v in hw.items())]
    return "\n".join(out) + "\n"


def _throughput_md(tp: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| run | devices | tokens/s per device | tokens/s total | step time | MFU | "
             "peak memory per process | compile / start-up |",
             "|---|---|---|---|---|---|---|---|"]
    for label, t in tp.items():
        start = t.get("compile_s", t.get("startup_s"))
        kind = "compile" if "compile_s" in t else "start-up"
        lines.append(
            f"| {label} | {t.get('num_devices', '-')} x {t.get('device_kind', '-')} | "
            f"{fmt(t.get('tokens_per_s'))} | {fmt(t.get('tokens_per_s_total'))} | "
            f"{fmt(t.get('step_time_s'))} s | {fmt(t.get('mfu'))} | "
            f"{_mib(t.get('peak_memory_bytes'))} | "
            f"{'-' if start is None else f'{kind} {fmt(start)} s'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _positive(xs: list[float]) -> list[float]:
    # log axes cannot show 0: an exact match is drawn at the smallest positive float32
    return [max(float(x), 1e-12) if math.isfinite(float(x)) else float("nan") for x in xs]


# figures: at PLOT_DPI a font of PLOT_MIN_PT points is >= 10 px, and no figure is wider
# than the page (PLOT_MAX_WIDTH_IN * PLOT_DPI = 1150 px < the report's 1200 px body)
PLOT_DPI = 100
PLOT_MIN_PT = 8
PLOT_MAX_WIDTH_IN = 11.5
_PLOT_RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
            "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9}


def _curve_limit(result: Mapping[str, Any], pair_name: str) -> float | None:
    """The limit of the loss-curve check of a pair (judged on the RMS over steps)."""
    tag = pair_name.split(":")[0]
    for c in result.get("checks") or []:
        if c["name"].startswith(f"{tag}: loss curve"):
            try:
                v = float(c["limit"])
            except (TypeError, ValueError):
                return None
            return v if math.isfinite(v) and v > 0 else None
    return None


def make_plots(result: Mapping[str, Any]) -> dict[str, str]:
    """Base64 PNGs: loss curves, |loss diff| vs floor and limit, per-parameter gradient
    margin, throughput and memory. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with plt.rc_context(_PLOT_RC):
        return _make_plots(result, plt)


def _make_plots(result: Mapping[str, Any], plt: Any) -> dict[str, str]:
    from matplotlib.patches import Patch

    plots: dict[str, str] = {}
    series = result.get("series") or {}
    pairs = result.get("pairs") or []

    if series:
        precisions = sorted({s.get("precision", "?") for s in series.values()})
        width = min(PLOT_MAX_WIDTH_IN, 5.5 * len(precisions))
        fig, axes = plt.subplots(1, len(precisions), figsize=(width, 4), squeeze=False)
        for ax, prec in zip(axes[0], precisions, strict=True):
            # DeepSpeed thin and dashed underneath, JAX thick on top: when they agree
            # (the usual case) both stay visible
            runs = [(k, v) for k, v in series.items() if v.get("precision") == prec]
            runs.sort(key=lambda kv: kv[1].get("side") == "jax")
            for label, s in runs:
                jax_side = s.get("side") == "jax"
                ax.plot(s["step"], s["loss"], "-" if jax_side else "--", label=label,
                        linewidth=2.4 if jax_side else 1.0, alpha=0.75 if jax_side else 1.0,
                        zorder=3 if jax_side else 2)
            ax.set_title(f"training loss ({prec}): JAX solid, DeepSpeed dashed")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()
        fig.tight_layout()
        plots["loss_curves"] = _png(fig)

    if pairs:
        ncols = min(2, len(pairs))
        nrows = -(-len(pairs) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(PLOT_MAX_WIDTH_IN if ncols > 1
                                                        else 6.5, 3.9 * nrows), squeeze=False)
        for ax in axes.ravel()[len(pairs):]:
            ax.set_visible(False)
        for ax, p in zip(axes.ravel(), pairs, strict=False):
            d = p.get("loss_abs_diff") or []
            ax.semilogy(range(len(d)), _positive(d), "o-", ms=3, color="tab:blue",
                        label="|jax - deepspeed|")
            f = p.get("floor_abs_diff") or []
            if f:
                ax.semilogy(range(len(f)), _positive(f), "s--", ms=3, alpha=0.7,
                            color="tab:orange", label=f"noise floor: {p.get('floor_name', '')}")
            if d:  # the judged statistic: the RMS over the steps, against the limit
                rms = math.sqrt(sum(x * x for x in d if math.isfinite(x)) / len(d))
                ax.axhline(max(rms, 1e-12), color="tab:blue", linestyle=":", linewidth=1.2,
                           label="RMS |jax - deepspeed|")
            lim = _curve_limit(result, p["name"])
            if lim is not None:
                ax.axhline(lim, color="tab:red", linestyle="-.", linewidth=1.4,
                           label="limit (on the RMS)")
            ax.set_title(p["name"])
            ax.set_xlabel("step")
            ax.set_ylabel("|loss difference| (0 at 1e-12)")
            ax.legend(loc="best")
        fig.tight_layout()
        plots["loss_diff"] = _png(fig)

    grad_pairs = [p for p in pairs if p.get("grad")]
    if grad_pairs:
        # one panel per precision, one marker series per pair (ZeRO stage)
        precs = sorted({p.get("precision", "fp32") for p in grad_pairs})
        fig, axes = plt.subplots(len(precs), 1, figsize=(PLOT_MAX_WIDTH_IN, 5.0 * len(precs)),
                                 squeeze=False)
        for ax, prec in zip(axes[:, 0], precs, strict=True):
            names: list[str] = []
            for k, p in enumerate(pp for pp in grad_pairs if pp.get("precision") == prec):
                names = list(p["grad"])
                vals = [p["grad"][n].get("margin", math.nan) for n in names]
                ax.semilogy(range(len(names)), _positive(vals), "osd^v"[k % 5], ms=4,
                            alpha=0.8, label=p["name"])
            ax.axhline(1.0, color="tab:red", linestyle="-.", label="limit (margin 1)")
            ax.legend(loc="best")
            # at most ~60 labels fit at a readable size: label every k-th tensor
            every = max(1, -(-len(names) // 60))
            ticks = list(range(0, len(names), every))
            ax.set_xticks(ticks)
            ax.set_xticklabels([_short(names[i]) for i in ticks], rotation=90,
                               fontsize=PLOT_MIN_PT)
            ax.set_ylabel("margin (distance from float64 / allowed)")
            ax.set_title(f"step-0 gradient per parameter, {prec}: margin <= 1 passes"
                         + (f" (every {every}th tensor labelled)" if every > 1 else ""))
        fig.tight_layout()
        plots["grad_error"] = _png(fig)

    tp = result.get("throughput") or {}
    if tp:
        labels = list(tp)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(PLOT_MAX_WIDTH_IN,
                                                    0.45 * len(labels) + 2.6))
        colors = ["tab:blue" if tp[k].get("side") == "jax" else "tab:orange" for k in labels]
        a1.barh(labels, [float(tp[k].get("tokens_per_s") or 0) for k in labels], color=colors)
        a1.set_xlabel("tokens/s per device")
        a1.set_title("throughput (warm-up excluded)")
        a2.barh(labels, [float(tp[k].get("peak_memory_bytes") or 0) / 2**20 for k in labels],
                color=colors)
        a2.set_xlabel("peak memory per process (MiB)")
        a2.set_title("peak memory")
        a2.set_yticklabels([])
        handles = [Patch(color="tab:blue", label="JAX"),
                   Patch(color="tab:orange", label="DeepSpeed")]
        for ax in (a1, a2):
            # room right of the longest bar, so the legend covers no bar
            right = max((p.get_width() for p in ax.patches), default=0.0)
            ax.set_xlim(0, 1.4 * right if right > 0 else 1.0)
            ax.legend(handles=handles, loc="lower right")
        fig.tight_layout()
        plots["throughput"] = _png(fig)
    return plots


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "")


# ----------------------------------------------------------------------------- html


def _table_html(header: list[str], rows: list[list[str]], classes: list[str] | None = None,
                kind: str | None = None) -> str:
    """A table; ``classes``: one class per row (pass/fail), ``kind``: the table's class
    (``checks``, ``kv``: the layout rules of :data:`_CSS`)."""
    h = "".join(f"<th>{html.escape(x)}</th>" for x in header)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>")
    table = f"<table class='{kind}'>" if kind else "<table>"
    return f"{table}<thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# Page layout (looked at in headless Chromium at 1280 px, tests/test_report_browser.py):
# text >= 13 px; numbers never break inside ("<= 2.829e-" / "06"), nor do the names of a
# key/value table; the checks' detail column wraps anywhere, so no table is wider than
# the page
_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
    "tr.fail{background:#fdd}tr.pass{background:#efe}"
    "table.checks td:first-child{min-width:16em}"
    "table.checks td:nth-child(n+2):nth-child(-n+6){white-space:nowrap}"
    "table.checks td:nth-child(7){overflow-wrap:anywhere}"
    "table.kv td:first-child{white-space:nowrap}"
    ".verdict{font-size:1.4em;font-weight:bold}"
    ".PASS{color:#080}.FAIL{color:#c00}img{max-width:100%}"
)


def render_html(result: Mapping[str, Any], plots: Mapping[str, str] | None = None,
                base: Path | None = None) -> str:
    """A single HTML file: summary, checks, figures without limits, throughput, plots
    (inline base64 PNG), set-up, versions, hardware."""
    if plots is None:
        plots = make_plots(result)
    ok = all_passed(result)
    name = (result.get("config") or {}).get("name", "?")
    checks = result.get("checks") or []
    head_line = headline(result)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>parity report: {html.escape(str(name))}</title><style>",
        _CSS,
        "</style></head><body>",
        (f"<p class='diagnosis'><b>Diagnosis: {html.escape(str(head_line))}</b></p>"
         if head_line else ""),
        f"<h1>Parity report: {html.escape(str(name))}</h1>",
        f"<p class='verdict {'PASS' if ok else 'FAIL'}'>{'PASS' if ok else 'FAIL'}: "
        f"{len(checks)} checks, {len(failing_checks(result))} failed</p>",
    ]
    if result.get("errors"):
        parts.append("<h2>Errors</h2><ul>" + "".join(
            f"<li><pre>{html.escape(str(e))}</pre></li>" for e in result["errors"]) + "</ul>")
    steps = [] if ok else next_steps(result)
    if steps:
        parts.append("<h2 id='next'>What to look at next</h2><ul>" + "".join(
            f"<li>{html.escape(t)}</li>" for t in steps) + "</ul>")
    parts.append("<h2>Checks</h2>")
    parts.append(_table_html(
        ["check", "value", "limit", "noise", "margin", "result", "detail"],
        [[c["name"], fmt(c["value"]), f"{c.get('op', '<=')} {fmt(c['limit'])}", _noise_text(c),
          _margin_text(c), "pass" if c["passed"] else "FAIL",
          ", ".join(f"{k}={_detail(v)}" for k, v in (c.get("detail") or {}).items())]
         for c in checks],
        ["pass" if c["passed"] else "fail" for c in checks], kind="checks",
    ))
    info = result.get("info") or []
    if info:
        parts.append("<h2>Reported figures (no limit)</h2>")
        parts.append(_table_html(["figure", "value", "note"],
                                 [[i["name"], fmt(i["value"]), str(i.get("note", ""))]
                                  for i in info]))
    titles = {
        "loss_curves": "Loss curves (JAX solid, DeepSpeed dashed)",
        "loss_diff": "|loss difference| per step against the noise floor (log scale)",
        "grad_error": "Per-parameter step-0 gradient margin (<= 1 passes)",
        "throughput": "Throughput and memory",
    }
    for key, title in titles.items():
        if key in plots:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{plots[key]}'>")
    tp = result.get("throughput") or {}
    if tp:
        parts.append("<h2>Throughput (warm-up steps excluded)</h2>")
        if (result.get("concurrent_jobs") or 1) > 1:
            parts.append(f"<p>{html.escape(CONCURRENT_NOTE.format(jobs=result['concurrent_jobs']))}</p>")
        rows = []
        for label, t in tp.items():
            start = t.get("compile_s", t.get("startup_s"))
            rows.append([label, f"{t.get('num_devices', '-')} x {t.get('device_kind', '-')}",
                         fmt(t.get("tokens_per_s")), fmt(t.get("tokens_per_s_total")),
                         fmt(t.get("step_time_s")), fmt(t.get("mfu")),
                         _mib(t.get("peak_memory_bytes")),
                         ("compile " if "compile_s" in t else "start-up ") + fmt(start)])
        parts.append(_table_html(["run", "devices", "tokens/s per device", "tokens/s total",
                                  "step time (s)", "MFU", "peak memory per process",
                                  "compile / start-up (s)"], rows))
    fwd = result.get("forward") or {}
    if fwd:
        parts.append("<h2>Forward (validation batch logits)</h2>")
        parts.append(_table_html(["pair", "max abs diff", "max rel diff", "mean KL"],
                                 [[k, fmt(v.get("max_abs")), fmt(v.get("max_rel")),
                                   fmt(v.get("mean_kl"))] for k, v in fwd.items()]))
    links = run_links(result, base)
    if links:
        parts.append("<h2 id='runs'>Runs</h2><table><thead><tr><th>run</th><th>log</th>"
                     "<th>metrics</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{html.escape(label)}</td>"
                         f"<td><a href='{html.escape(log)}'>train.log</a></td>"
                         f"<td><a href='{html.escape(met)}'>metrics.jsonl</a></td></tr>"
                         for label, log, met in links) + "</tbody></table>")
    for title, key, head in (("Set-up", "setup", ["setting", "value"]),
                             ("Versions", "versions", ["package", "version"]),
                             ("Hardware", "hardware", ["property", "value"])):
        d = result.get(key) or {}
        if d:
            parts.append(f"<h2>{title}</h2>")
            parts.append(_table_html(head, [[str(k), str(v)] for k, v in d.items()],
                                     kind="kv"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(result: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and report.html (atomically) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = _json_safe(dict(result))
    safe["passed"] = all_passed(result)
    paths = {
        "json": atomic_write_json(out / "report.json", safe),
        "md": atomic_write_text(out / "report.md", render_markdown(result, out)),
        "html": atomic_write_text(out / "report.html", render_html(result, base=out)),
    }
    return paths


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report.json back (inf/nan values come back as strings)."""
    return json.loads(Path(path).read_text())
