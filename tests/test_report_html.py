"""sppjit report --html: one self-contained file, checked as a browser sees it.

The page is parsed here (every table and image is there, every image is an inline PNG of the
plot's size, nothing is fetched from elsewhere), then rendered by a real headless Chromium
(Debian's package, which .ci/run installs): a copy of the page with a probe script appended
reports, once the page has loaded, each image's decoded (natural) size and each table's
rows into the DOM, which ``--dump-dom`` prints. The test skips only where Chromium is
absent outside CI; with CI=true a missing Chromium fails it.
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sppjit.cli import app
from sppjit.io.protect import ByteRanges
from sppjit.report import write_report

pytest.importorskip("matplotlib")
runner = CliRunner()
PAGE = 0x100 << 12


def chromium() -> str:
    """The Chromium binary, or a skip (a failure in CI) saying why there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    why = ("chromium is not installed (Debian: apt-get install chromium; .ci/run installs "
           "it): the HTML report is not rendered in a browser")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """A replay with hooks (two pages, writes on and beside the hooks, 2 vCPUs) written as
    sppjit replay writes it, and the compare document of the same trace."""
    d = tmp_path_factory.mktemp("html")
    hooks = ByteRanges(gpa=np.array([PAGE + 120, PAGE + 0x1000 + 512], dtype=np.uint64),
                       length=np.array([16, 64], dtype=np.uint32), name=["cred", "ops"])
    pq.write_table(pa.table({"gpa": pa.array(hooks.gpa, pa.uint64()),
                             "length": pa.array(hooks.length, pa.uint32()),
                             "name": pa.array(hooks.name)}), d / "hooks.parquet")
    rng = np.random.default_rng(3)
    offsets = rng.choice([124, 200, 1000, 0x1000 + 520, 0x1000 + 600, 0x1000 + 3000], 400)
    trace = pa.table({"gpa": pa.array(PAGE + offsets.astype(np.uint64), pa.uint64()),
                      "size": pa.array(np.full(400, 8), pa.uint16()),
                      "vcpu": pa.array(rng.integers(0, 2, 400), pa.uint16()),
                      "kind": pa.array(np.ones(400), pa.uint8())})
    pq.write_table(trace, d / "t.parquet")
    result = runner.invoke(app, ["replay", str(d / "t.parquet"), "--protect",
                                 str(d / "hooks.parquet"), "--memory", "64MiB", "--vcpus", "2",
                                 "--out", str(d / "r.parquet"), "--exits", str(d / "e.parquet"),
                                 "--summary", str(d / "s.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", str(d / "t.parquet"), "--protect",
                                 str(d / "hooks.parquet"), "--memory", "64MiB", "--vcpus", "2",
                                 "--summary", str(d / "c.json")])
    assert result.exit_code == 0, result.output
    return d


class _Page(html.parser.HTMLParser):
    """Tables (id -> body rows), images (id -> src) and every URL the page would fetch."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, int] = {}
        self.images: dict[str, str] = {}
        self.fetched: list[str] = []
        self.scripts = 0
        self._table = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images[a.get("id")] = a.get("src", "")
        elif tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if key in a and not a[key].startswith("data:"):
                self.fetched.append(a[key])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_page_is_self_contained_and_holds_every_part(replayed):
    d = replayed
    done = write_report(str(d / "r.parquet"), str(d / "e.parquet"), summary=str(d / "c.json"),
                        html=str(d / "report.html"))
    assert done.written == [str(d / "report.html")]
    text = (d / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert page.fetched == [] and page.scripts == 0  # nothing from elsewhere, no script
    assert set(page.images) == {"exits_over_time", "violations_heatmap", "compare_bars"}
    for src in page.images.values():
        assert src.startswith("data:image/png;base64,")
        assert png_size(base64.b64decode(src.split(",", 1)[1])) == (1200, 800)
    assert page.tables["summary"] >= 10
    compare = json.loads((d / "c.json").read_text())
    assert page.tables["compare"] > 20
    assert page.tables["top-pages"] == 2  # the two hooked pages
    assert page.tables["hooks-0"] == 2  # cred, ops
    for c in compare["configs"]:
        assert f"<th>{c['name']}</th>" in text
    # the savings line and the v4 / v12 note, as the command prints them
    assert re.search(r"spp_v4: [-+0-9.]+% exits", text)
    assert "Why v4 and v12 differ here" in text
    # the page reads as text too: the names of the hooks
    assert "<th>cred</th>" in text and "<th>ops</th>" in text


def test_cli_html_and_its_errors(replayed, tmp_path):
    d = replayed
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(d / "r.parquet"), "--exits", str(d / "e.parquet"),
                                 "--summary", str(d / "s.json"), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and out.stat().st_size > 10_000
    bad = runner.invoke(app, ["report", str(d / "r.parquet"), "--html",
                              str(tmp_path / "missing" / "r.html")])
    assert bad.exit_code == 2 and "--html: directory does not exist" in bad.output
    assert not (tmp_path / "missing").exists()
    bad = runner.invoke(app, ["report", str(d / "r.parquet"), "--protect",
                              str(tmp_path / "nope.parquet"), "--html", str(out)])
    assert bad.exit_code == 2 and "--protect" in bad.output and "Traceback" not in bad.output


PROBE = """
<pre id="probe"></pre>
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => ({
    id: i.id, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const tables = Array.from(document.querySelectorAll("table")).map(t => ({
    id: t.id, rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0}));
  document.getElementById("probe").textContent =
    "PROBE" + JSON.stringify({images, tables, title: document.title}) + "EBORP";
});
</script>
"""


def run_chromium(*args, timeout=120):
    binary = chromium()
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--disable-extensions", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_chromium_decodes_the_plots_and_shows_the_tables(replayed, tmp_path):
    d = replayed
    write_report(str(d / "r.parquet"), str(d / "e.parquet"), summary=str(d / "c.json"),
                 html=str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    run = run_chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    match = re.search(r"PROBE(.*?)EBORP", run.stdout, re.S)
    assert match, (run.returncode, run.stderr[-2000:])
    seen = json.loads(html.unescape(match.group(1)))
    assert seen["title"].startswith("sppjit report: ")
    images = {i["id"]: i for i in seen["images"]}
    assert set(images) == {"exits_over_time", "violations_heatmap", "compare_bars"}
    for image in images.values():  # decoded by the browser, at the plot's size
        assert image["complete"] and (image["width"], image["height"]) == (1200, 800), image
    tables = {t["id"]: t["rows"] for t in seen["tables"]}
    assert tables["summary"] >= 10 and tables["compare"] > 20
    assert tables["top-pages"] == 2 and tables["hooks-0"] == 2

    # and a screenshot of the page as it is (no probe): painted, not blank
    shot = tmp_path / "shot.png"
    run = run_chromium(f"--screenshot={shot}", "--window-size=1300,2600",
                       (tmp_path / "report.html").as_uri())
    assert shot.is_file(), (run.returncode, run.stderr[-2000:])
    mpimg = pytest.importorskip("matplotlib.image")
    image = mpimg.imread(shot)
    assert image.shape[:2] == (2600, 1300)
    assert float(image[..., :3].var()) > 0.01
    # the plots' colours are on the page: the reds of protection exits
    rgb = image[..., :3]
    assert ((rgb[..., 0] - rgb[..., 2]) > 0.3).sum() > 1000


def test_without_chromium_skip_outside_ci_and_fail_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but chromium is not installed"):
        chromium()
