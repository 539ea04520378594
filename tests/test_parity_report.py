"""Report writers on a synthetic result: JSON round trip, markdown table, HTML plots,
and the pass/fail verdict that decides the exit code."""

from __future__ import annotations

import base64
import json
import math

import pytest

from parity import compare as C
from parity import report as R


def synthetic_result(fail: bool = False) -> dict:
    steps = list(range(6))
    loss_j = [4.0 - 0.1 * s for s in steps]
    loss_d = [x * (1 + 1e-7) for x in loss_j]
    loss_d3 = [x * (1 + 2e-7) for x in loss_j]
    from parity.judge import Judged

    checks = [
        C.judged_check("fp32 zero1: loss curve", "fp32.loss",
                       Judged(value=C.rms_gap(loss_j, loss_d), limit=3e-6, noise=4e-7)),
        C.judged_check("fp32 zero1: grad vs float64", "fp32.grad",
                       Judged(value=3e-7, limit=8e-7, noise=2e-7), param="lm_head"),
        C.judged_check("bf16 zero1: grad vs float64", "bf16.grad",
                       Judged(value=9e-3 if fail else 2e-3, limit=4e-3, noise=2e-3)),
    ]
    grad = {f"model.layers.0.mlp.p{i}.weight": {"rel_err": 10.0 ** -(7 - i % 3),
                                                 "margin": 0.1 * (i + 1), "cosine": 1.0 - 1e-9}
            for i in range(5)}
    series = {
        "jax fp32": {"side": "jax", "precision": "fp32", "zero_stage": None, "step": steps,
                     "loss": loss_j, "grad_norm": [1.0] * 6, "lr": [1e-3] * 6,
                     "batch_fingerprint": ["a"] * 6},
        "ds zero1 fp32": {"side": "torch", "precision": "fp32", "zero_stage": 1,
                          "step": steps, "loss": loss_d, "grad_norm": [1.0] * 6,
                          "lr": [1e-3] * 6, "batch_fingerprint": ["a"] * 6},
        "ds zero3 fp32": {"side": "torch", "precision": "fp32", "zero_stage": 3,
                          "step": steps, "loss": loss_d3, "grad_norm": [1.0] * 6,
                          "lr": [1e-3] * 6, "batch_fingerprint": ["a"] * 6},
    }
    return {
        "config": {"name": "synthetic"},
        "versions": {"numpy": "x"},
        "hardware": {"cpu": "test"},
        "setup": {"jax devices": "2 virtual CPU devices"},
        "forward": {"jax vs torch": {"max_abs": 1e-6, "max_rel": 1e-7, "mean_kl": 1e-12}},
        "series": series,
        "pairs": [{"name": "fp32 zero1", "precision": "fp32", "test": "jax fp32",
                   "ref": "ds zero1 fp32", "loss_abs_diff": C.abs_diff_series(loss_j, loss_d),
                   "floor_name": "zero1 vs zero3",
                   "floor_abs_diff": C.abs_diff_series(loss_d, loss_d3),
                   "grad": grad, "update": grad}],
        "throughput": {"jax fp32": {"side": "jax", "tokens_per_s": 1000.0,
                                    "peak_memory_bytes": 2**20 * 300, "compile_s": 3.0,
                                    "num_devices": 2, "device_kind": "cpu"},
                       "ds zero1 fp32": {"side": "torch", "tokens_per_s": 800.0,
                                         "peak_memory_bytes": 2**20 * 500, "startup_s": 9.0,
                                         "num_devices": 2, "device_kind": "cpu"}},
        "checks": [c.to_dict() for c in checks],
        "info": [{"name": "fp32 noise floor", "value": 1e-7, "note": "zero1 vs zero3"},
                 {"name": "nan figure", "value": math.nan, "note": ""}],
    }


def test_verdict_and_exit_code():
    assert R.exit_code(synthetic_result()) == 0
    bad = synthetic_result(fail=True)
    assert R.exit_code(bad) == 1
    assert [c["name"] for c in R.failing_checks(bad)] == ["bf16 zero1: grad vs float64"]
    assert R.exit_code({"checks": []}) == 1  # nothing checked is not a pass
    err = synthetic_result()
    err["errors"] = ["torch bf16 run failed"]
    assert R.exit_code(err) == 1


def test_write_reports_round_trip(tmp_path):
    res = synthetic_result(fail=True)
    paths = R.write_reports(res, tmp_path)
    assert set(paths) == {"json", "md", "html"}
    data = json.loads(paths["json"].read_text())  # strict JSON: no NaN/Infinity tokens
    assert data["passed"] is False
    assert data["info"][1]["value"] == "nan"
    assert [c["name"] for c in data["checks"]] == [c["name"] for c in res["checks"]]
    for c in data["checks"]:
        assert set(c) >= {"name", "value", "limit", "passed", "noise", "margin"}
    assert data["series"]["jax fp32"]["loss"] == res["series"]["jax fp32"]["loss"]
    assert data["throughput"]["ds zero1 fp32"]["startup_s"] == 9.0


def test_markdown_table(tmp_path):
    md = R.render_markdown(synthetic_result(fail=True))
    assert "FAIL" in md.splitlines()[0]
    rows = [line for line in md.splitlines() if line.startswith("| bf16 zero1: grad vs")]
    assert rows == ["| bf16 zero1: grad vs float64 | 0.009 | <= 0.004 | 0.002 | 2.25 | **FAIL** |"]
    assert ("| fp32 zero1: grad vs float64 | 3.000e-07 | <= 8.000e-07 | 2.000e-07 | 0.375 | "
            "pass |") in md
    assert "PASS" in R.render_markdown(synthetic_result()).splitlines()[0]
    assert "300.0 MiB" in md and "compile 3 s" in md
    assert "Diagnosis" not in md


def test_diagnosis_headline_leads_the_reports():
    res = synthetic_result(fail=True)
    res["diagnosis"] = {"headline": "first divergence: layer 0 mlp output at step 0"}
    md = R.render_markdown(res)
    assert md.splitlines()[0] == "**Diagnosis: first divergence: layer 0 mlp output at step 0**"
    page = R.render_html(res, {})
    assert page.index("Diagnosis: first divergence") < page.index("<h1>")


def test_html_is_self_contained_with_four_plots(tmp_path):
    res = synthetic_result()
    plots = R.make_plots(res)
    assert set(plots) == {"loss_curves", "loss_diff", "grad_error", "throughput"}
    for b64 in plots.values():
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    page = R.render_html(res, plots)
    assert page.count("data:image/png;base64,") == 4
    assert "src='http" not in page and "<script" not in page
    assert "PASS" in page


@pytest.mark.parametrize("v,text", [(None, "-"), (0, "0"), (1e-7, "1.000e-07"),
                                    (0.1234567, "0.123457"), (math.inf, "inf")])
def test_fmt(v, text):
    assert R.fmt(v) == text


def test_plots_are_readable(monkeypatch):
    """Every figure: no wider than the page, every text >= 10 px, every visible axes has
    a title and a legend; the |loss diff| panel draws its check's limit; the JAX loss
    line is drawn above the DeepSpeed ones."""
    import matplotlib.text

    figs = {}
    real_png = R._png

    def keep(fig):
        figs[len(figs)] = fig
        w_px = fig.get_size_inches()[0] * R.PLOT_DPI
        assert w_px <= 1200, w_px
        for t in fig.findobj(matplotlib.text.Text):
            if t.get_visible() and t.get_text().strip():
                assert t.get_fontsize() * R.PLOT_DPI / 72 >= 10, (t.get_text(), t.get_fontsize())
        for ax in fig.axes:
            if ax.get_visible():
                assert ax.get_title(), "an untitled panel"
                assert ax.get_legend() is not None, ax.get_title()
        return real_png(fig)

    monkeypatch.setattr(R, "_png", keep)
    result = synthetic_result()
    result["checks"][0]["name"] = "fp32 zero1: loss curve vs noise (6 steps)"
    plots = R.make_plots(result)
    assert set(plots) == {"loss_curves", "loss_diff", "grad_error", "throughput"}
    assert len(figs) == 4
    loss_ax = figs[0].axes[0]
    jax_line = [ln for ln in loss_ax.get_lines() if ln.get_label() == "jax fp32"][0]
    assert all(jax_line.get_zorder() > ln.get_zorder() for ln in loss_ax.get_lines()
               if ln is not jax_line)
    diff_ax = figs[1].axes[0]
    limit = result["checks"][0]["limit"]
    assert any(ln.get_label() == "limit (on the RMS)" and ln.get_ydata()[0] == limit
               for ln in diff_ax.get_lines())


def test_throughput_legends_cover_no_bar(monkeypatch):
    """The bar charts leave room right of the longest bar for their legends (seen in
    headless Chromium: the legend sat on the JAX bar)."""
    from matplotlib.patches import Rectangle

    figs = []
    real_png = R._png
    monkeypatch.setattr(R, "_png", lambda fig: (figs.append(fig), real_png(fig))[1])
    result = synthetic_result()
    R.make_plots({"throughput": result["throughput"]})
    (fig,) = figs
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed: a new canvas
    fig.draw(renderer)
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() > 0]
        assert bars
        for bar in bars:
            assert not legend.overlaps(bar.get_window_extent(renderer)), ax.get_title()


def test_report_links_next_steps_headers_and_modes(tmp_path):
    """Links to every run's train.log and metrics.jsonl (relative to the report), a
    'what to look at next' section only when it fails, no empty table header, and files
    written with the umask's mode (0644 here), not the temporary file's 0600."""
    import os
    import re

    result = synthetic_result(fail=True)
    runs = {}
    for label in ("jax fp32", "ds zero1 fp32"):
        d = tmp_path / "out" / "runs" / label.replace(" ", "_")
        d.mkdir(parents=True)
        (d / "train.log").write_text("log")
        (d / "metrics.jsonl").write_text("")
        runs[label] = {"out_dir": str(d), "seconds": 1.0, "error": None}
    result["runs"] = runs
    old = os.umask(0o022)
    try:
        paths = R.write_reports(result, tmp_path / "out")
    finally:
        os.umask(old)
    page = paths["html"].read_text()
    for label in runs:
        rel = f"runs/{label.replace(' ', '_')}"
        for f in ("train.log", "metrics.jsonl"):
            assert f"href='{rel}/{f}'" in page
            assert (tmp_path / "out" / rel / f).is_file()
        assert f"({rel}/train.log)" in paths["md"].read_text()
    assert "What to look at next" in page and "What to look at next" in paths["md"].read_text()
    assert "bf16 zero1: grad vs float64: The step-0 gradient is off" in page
    assert not re.search(r"<th>\s*</th>", page)
    for p in paths.values():
        assert (p.stat().st_mode & 0o777) == 0o644, (p, oct(p.stat().st_mode))
    good = R.write_reports(synthetic_result(), tmp_path / "ok")
    assert "What to look at next" not in good["html"].read_text()
