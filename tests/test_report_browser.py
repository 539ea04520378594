"""report.html as a browser shows it: headless Chromium opens a report built from the
synthetic results of tests/test_parity_report.py (no trainer runs) and the rendered page
is checked: the verdict, a checks table with a full header row, every plot image decoded
and laid out, links to each run's train.log and metrics.jsonl, the "what to look at next"
section when the run fails, text >= 10 px, figures not broken across lines and nothing
wider than the window; and the screenshot is not blank.

Chromium runs the page twice: ``--dump-dom`` on a copy with a small probe script (the
report itself has no script; the probe measures what only a browser knows: decoded image
sizes, computed font sizes, element boxes, and writes them into the DOM that is dumped),
and ``--screenshot`` on the report itself.

Needs a Chromium binary (``chromium``, ``chromium-browser``, ``google-chrome`` on PATH, or
``CHROMIUM=/path``); without one the tests skip. To install it on Debian/Ubuntu:
``apt-get install -y --no-install-recommends chromium fonts-dejavu-core`` (``.ci/run``
does this when it runs as root or with sudo).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from parity import report as R

sys.path.insert(0, str(Path(__file__).parent))
from test_parity_report import synthetic_result  # noqa: E402

WINDOW = (1280, 2000)  # the report's default reading width; the screenshot's size
MIN_FONT_PX = 10
CHROMIUM_TIMEOUT_S = 90
PLOTS = {"loss_curves", "loss_diff", "grad_error", "throughput"}


def find_chromium() -> str | None:
    given = os.environ.get("CHROMIUM")
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium (chromium, chromium-browser or google-chrome on PATH, or CHROMIUM="
    "/path): apt-get install -y --no-install-recommends chromium fonts-dejavu-core")

# Added to a copy of the page only: after load, write what the browser laid out into the
# DOM (<pre id="probe">JSON</pre>) for --dump-dom to carry out.
PROBE = """<script>
addEventListener('load', function () {
  var doc = document.documentElement, small = [], wide = [], minFont = 1e9;
  var imgs = Array.from(document.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
            shown: [i.getBoundingClientRect().width, i.getBoundingClientRect().height]};
  });
  var walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walk.nextNode()) {
    var el = walk.currentNode.parentElement, text = walk.currentNode.textContent.trim();
    if (!text || el.closest('script')) continue;
    var px = parseFloat(getComputedStyle(el).fontSize);
    minFont = Math.min(minFont, px);
    if (px < MIN_FONT_PX) small.push(text.slice(0, 60) + ' (' + px + ' px)');
  }
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.right > doc.clientWidth + 0.5) wide.push(el.tagName + ' to ' + Math.round(r.right));
  });
  var broken = [];  // figures of the checks table laid out on more than one line
  document.querySelectorAll('table.checks td:nth-child(-n+6):not(:first-child)')
    .forEach(function (td) {
      var range = document.createRange();
      range.selectNodeContents(td);
      var lines = new Set(Array.from(range.getClientRects()).map(function (r) {
        return Math.round(r.top); }));
      if (lines.size > 1) broken.push(td.textContent);
    });
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({imgs: imgs, min_font_px: minFont, small: small,
    wide: wide, broken: broken, scroll_width: doc.scrollWidth, client_width: doc.clientWidth});
  document.body.appendChild(out);
});
</script>""".replace("MIN_FONT_PX", str(MIN_FONT_PX))


# ----------------------------------------------------------------------------- helpers


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self, tag: str | None = None):
        for c in self.children:
            if tag is None or c.tag == tag:
                yield c
            yield from c.iter(tag)


class _Tree(HTMLParser):
    VOID = {"img", "meta", "br", "hr", "link", "input", "source", "wbr", "col", "area"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].parts.append(data)


def parse(html_text: str) -> Node:
    t = _Tree()
    t.feed(html_text)
    t.close()
    return t.root


def chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={user_dir}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                          env={**os.environ, "HOME": str(user_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def assert_not_blank(data: bytes, what: str) -> Any:
    """A decodable image of more than one colour with some ink on it; returns it (RGB)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decodes every row: a truncated or corrupt stream fails here
    rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f"{what}: {len(colours)} colours"
    hist = rgb.convert("L").histogram()
    ink = sum(hist[:200]) / (rgb.width * rgb.height)  # darker than light grey
    assert ink > 0.01, f"{what}: {ink:.2%} of the pixels are not near-white"
    return rgb


def build_report(root: Path, fail: bool) -> tuple[Path, dict[str, Any]]:
    """report.html of the synthetic result, with run folders (train.log, metrics.jsonl)
    and, when failing, a diagnosis and a detail too long for any column."""
    result = synthetic_result(fail=fail)
    runs = {}
    for label in ("jax fp32", "ds zero1 fp32", "ds zero3 fp32"):
        d = root / "runs" / label.replace(" ", "_")
        d.mkdir(parents=True)
        (d / "train.log").write_text("step 0 loss 4.0\n")
        (d / "metrics.jsonl").write_text("")
        runs[label] = {"out_dir": str(d), "seconds": 1.0, "error": None}
    result["runs"] = runs
    if fail:
        result["diagnosis"] = {"headline": "first divergence: layer 0 mlp output at step 0"}
        result["checks"][2]["detail"]["param"] = "model.layers.0." + "x" * 300 + ".weight"
    return R.write_reports(result, root)["html"], result


def rendered(page: Path, tmp: Path) -> tuple[Node, dict[str, Any]]:
    """(the DOM Chromium rendered, the probe's measurements) of ``page``."""
    probe = page.with_name("probe.html")  # same folder: the links resolve the same way
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = parse(chromium("--dump-dom", probe.as_uri(), user_dir=tmp / "chrome-dom").stdout)
    (pre,) = [n for n in dom.iter("pre") if n.attrs.get("id") == "probe"]
    return dom, json.loads(pre.text)


# ----------------------------------------------------------------------------- tests


def test_failing_report_renders_with_its_key_elements(tmp_path):
    page, result = build_report(tmp_path / "report", fail=True)
    dom, probe = rendered(page, tmp_path)

    # the verdict, in red, and the diagnosis before the title
    (verdict,) = [n for n in dom.iter("p") if "verdict" in n.classes()]
    assert "FAIL" in verdict.classes() and verdict.text.startswith("FAIL: 3 checks, 1 failed")
    body_text = dom.text
    assert body_text.index("Diagnosis: first divergence") < body_text.index("Parity report")

    # the checks table: a header row with every column named, one row per check
    (checks,) = [t for t in dom.iter("table") if "checks" in t.classes()]
    header = [th.text.strip() for th in checks.iter("th")]
    assert header == ["check", "value", "limit", "noise", "margin", "result", "detail"]
    rows = list(next(checks.iter("tbody")).iter("tr"))
    assert [r.classes() for r in rows] == [{"pass"}, {"pass"}, {"fail"}]
    assert [next(r.iter("td")).text for r in rows] == [c["name"] for c in result["checks"]]
    for table in dom.iter("table"):  # no table without a full header row
        ths = [th.text.strip() for th in table.iter("th")]
        assert ths and all(ths), ths

    # every plot: an embedded PNG that decodes, of a sane size, laid out at that size
    imgs = {n.attrs["alt"]: n.attrs["src"] for n in dom.iter("img")}
    assert set(imgs) == PLOTS
    shown = {i["alt"]: i for i in probe["imgs"]}
    for alt, src in imgs.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), (alt, src[:40])
        data = base64.b64decode(src[len(prefix):], validate=True)
        w, h = png_size(data)
        assert 300 <= w <= 1200 and 150 <= h <= 3000, (alt, w, h)
        assert_not_blank(data, alt)
        assert shown[alt]["complete"] and shown[alt]["natural"] == [w, h], shown[alt]
        assert shown[alt]["shown"][0] == pytest.approx(w, abs=1), shown[alt]  # not squeezed

    # links to each run's train.log and metrics.jsonl, which exist where they point
    hrefs = {n.attrs.get("href") for n in dom.iter("a")}
    for label, run in result["runs"].items():
        for name in ("train.log", "metrics.jsonl"):
            href = f"runs/{label.replace(' ', '_')}/{name}"
            assert href in hrefs, href
            assert (page.parent / href).resolve() == (Path(run["out_dir"]) / name).resolve()

    # what to look at next: present, first item the diagnosis
    (nxt,) = [h for h in dom.iter("h2") if h.attrs.get("id") == "next"]
    assert nxt.text == "What to look at next"
    items = [li.text for li in dom.iter("li")]
    assert items[0].startswith("Start with the diagnosis")
    assert any("bf16 zero1: grad vs float64" in t for t in items)

    # layout: readable text, figures on one line, nothing wider than the window (the
    # long detail wraps)
    assert probe["min_font_px"] >= MIN_FONT_PX and not probe["small"], probe["small"]
    assert not probe["broken"], probe["broken"]
    assert not probe["wide"] and probe["scroll_width"] <= probe["client_width"], probe

    # the screenshot: the window's size, not blank, the red verdict drawn
    shot = tmp_path / "report_fail.png"
    chromium(f"--screenshot={shot}", page.as_uri(), user_dir=tmp_path / "chrome-shot")
    data = shot.read_bytes()
    assert png_size(data) == WINDOW
    rgb = assert_not_blank(data, "screenshot")
    red = sum(n for n, (r, g, b) in rgb.getcolors(maxcolors=1 << 20)
              if r > 180 and g < 40 and b < 40)
    assert red > 200, f"{red} red pixels: the FAIL verdict (#c00) is not drawn"
    print(f"screenshot: {shot}")  # noqa: T201 - where to look at it


def test_passing_report_renders_without_next_steps(tmp_path):
    page, _ = build_report(tmp_path / "report", fail=False)
    dom, probe = rendered(page, tmp_path)
    (verdict,) = [n for n in dom.iter("p") if "verdict" in n.classes()]
    assert "PASS" in verdict.classes() and verdict.text.startswith("PASS: 3 checks, 0 failed")
    assert not [h for h in dom.iter("h2") if h.attrs.get("id") == "next"]
    assert "What to look at next" not in dom.text
    assert {i["alt"] for i in probe["imgs"] if i["complete"] and i["natural"][0] > 0} == PLOTS
    assert probe["min_font_px"] >= MIN_FONT_PX and not probe["wide"], probe
