"""sppjit report: per-page and per-sub-page statistics counted by hand, epochs, the streaming
merge against a one-batch run, plots (size, not blank), the compare bars, report.json and the
command line (``report`` is mounted on the app here; cli.py mounts it for users).

The hand-made replay: gfn 0x100 has sub-pages 0 and 1 write-protected (access map 0xFFFFFFFC),
replayed with the reference engine (no compilation of the replay kernel needed):

row  access                          exits (kind @ gpa)
0    write 8 @ 0x100008              ept_fault @ 0x100008, spp_violation @ 0x100008
1    write 8 @ 0x1000c8 (sub-page 1) spp_violation @ 0x1000c8
2    write 8 @ 0x1003e8 (sub-page 7) -
3    read 8 @ 0x100008               -
4    write 8 @ 0x100ffc (crosses)    ept_fault @ 0x101000 (the piece on gfn 0x101)
5    write 256 @ 0x100040            spp_violation @ 0x100040 (bytes 64..319: sub-pages 0, 1, 2)
6    fetch 8 @ 0x102000              ept_fault @ 0x102000
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sppjit
from sppjit import report as R
from sppjit.cli import app
from sppjit.commands.report import EPILOG, HELP, report
from sppjit.io.protect import ByteRanges, ranges_to_maps
from sppjit.replay import replay

if "report" not in {c.name for c in app.registered_commands}:
    app.command("report", help=HELP, epilog=EPILOG)(report)

runner = CliRunner()

PAGE = 0x100 << 12
GPA = [PAGE + 8, PAGE + 200, PAGE + 1000, PAGE + 8, PAGE + 4092, PAGE + 64, 0x102000]
SIZE = [8, 8, 8, 8, 8, 256, 8]
KIND = [1, 1, 1, 0, 1, 1, 2]


def hand_replay(granularity: str = "spp"):
    vm = sppjit.VM(memory="64MiB", granularity=granularity)
    vm.init_spp()
    vm.set_subpages(0x100, [0xFFFFFFFC])
    trace = {"gpa": np.array(GPA, dtype=np.uint64), "size": np.array(SIZE, dtype=np.uint16),
             "kind": np.array(KIND, dtype=np.uint8)}
    return vm.replay(trace, engine="reference")


@pytest.fixture(scope="module")
def hand():
    return hand_replay()


@pytest.fixture(scope="module")
def files(hand, tmp_path_factory):
    """The hand replay written as sppjit replay would: results Parquet, exit log Arrow IPC,
    summary JSON."""
    d = tmp_path_factory.mktemp("replay")
    pq.write_table(hand.table, d / "r.parquet")
    with ipc.new_file(str(d / "e.arrow"), hand.exits.schema) as w:
        w.write_table(hand.exits)
    summary = dict(hand.summary, input={"path": "t.parquet", "rows": 7, "seed": 42})
    (d / "s.json").write_text(json.dumps(summary))
    return d


def by_gfn(table):
    return {row["gfn"]: row for row in table.to_pylist()}


# ------------------------------------------------------------------------------ hand counts

def test_the_hand_replay_is_what_the_module_docstring_says(hand):
    exits = [(e["row"], e["kind"], e["gpa"]) for e in hand.exits.to_pylist()]
    assert exits == [
        (0, "ept_fault", PAGE + 8), (0, "spp_violation", PAGE + 8),
        (1, "spp_violation", PAGE + 200),
        (4, "ept_fault", 0x101000),
        (5, "spp_violation", PAGE + 64),
        (6, "ept_fault", 0x102000),
    ]


def test_per_page_counts_by_hand(files):
    per_page, _ = R.page_stats(str(files / "r.parquet"), str(files / "e.arrow"))
    pages = by_gfn(per_page)
    assert sorted(pages) == [0x100, 0x101, 0x102]
    zero = {k: 0 for k in R.KINDS}
    assert pages[0x100] == {
        "gfn": 0x100, "accesses": 6, "reads": 1, "writes": 5, "fetches": 0, "exits": 4,
        **zero, "ept_fault": 1, "spp_violation": 3, "violations": 3,
        "first_row": 0, "last_row": 5}
    # the crossing write counts on both pages; its exit on the page it faulted on
    assert pages[0x101] == {
        "gfn": 0x101, "accesses": 1, "reads": 0, "writes": 1, "fetches": 0, "exits": 1,
        **zero, "ept_fault": 1, "violations": 0, "first_row": 4, "last_row": 4}
    assert pages[0x102] == {
        "gfn": 0x102, "accesses": 1, "reads": 0, "writes": 0, "fetches": 1, "exits": 1,
        **zero, "ept_fault": 1, "violations": 0, "first_row": 6, "last_row": 6}
    assert per_page.schema.field("gfn").type == pa.uint64()
    assert per_page.column_names[-2:] == ["first_row", "last_row"]


def test_per_subpage_counts_by_hand(files):
    _, per_subpage = R.page_stats(str(files / "r.parquet"), str(files / "e.arrow"))
    got = {(r["gfn"], r["subpage"]): (r["writes"], r["violations"])
           for r in per_subpage.to_pylist()}
    assert got == {
        (0x100, 0): (2, 2),  # rows 0 and 5 write it; both fault on it
        (0x100, 1): (2, 2),  # rows 1 and 5
        (0x100, 2): (1, 1),  # row 5's 256 bytes reach it; its faulting piece covers it
        (0x100, 7): (1, 0),
        (0x100, 31): (1, 0),  # row 4, first piece
        (0x101, 0): (1, 0),  # row 4, second piece
    }
    assert per_subpage.schema.field("subpage").type == pa.uint8()


def test_epochs_and_totals(hand):
    stats = R.analyze(hand, epochs=7)
    ep = stats.epochs.to_pydict()
    assert ep["first_row"] == list(range(7)) and ep["rows"] == [1] * 7
    assert ep["exits"] == [2, 1, 0, 0, 1, 1, 1]
    assert ep["ept_fault"] == [1, 0, 0, 0, 1, 0, 1]
    assert ep["spp_violation"] == [1, 1, 0, 0, 0, 1, 0]
    assert ep["violations"] == ep["spp_violation"]
    assert ep["writes"] == [1, 1, 1, 0, 1, 1, 0]
    t = stats.totals
    assert t["counts"]["accesses"] == 7 and t["counts"]["writes"] == 5
    assert t["counts"]["spp_violation"] == 3 and t["counts"]["allowed"] == 4
    assert t["exits"]["total"] == 6 and t["exits"]["ept_fault"] == 3
    assert t["exits_per_1000_writes"] == pytest.approx(1200.0)
    assert t["pages"] == {"touched": 3, "with_exits": 3, "with_violations": 1}
    assert t["subpages"] == {"written": 6, "violated": 3}
    # fewer rows than epochs: one epoch per row; more: equal runs, all rows covered
    assert R.analyze(hand, epochs=100).epochs.num_rows == 7
    three = R.analyze(hand, epochs=3).epochs.to_pydict()
    assert three["first_row"] == [0, 3, 5] and three["rows"] == [3, 2, 2]
    assert three["exits"] == [3, 1, 2]


def test_without_an_exit_log_kinds_are_null_and_exits_go_to_the_first_page(hand):
    per_page, per_subpage = R.page_stats(hand.table)
    pages = by_gfn(per_page)
    assert pages[0x100]["exits"] == 5  # row 4's exit (on gfn 0x101) counts on its first page
    assert pages[0x101]["exits"] == 0 and pages[0x102]["exits"] == 1
    assert all(pages[g]["spp_violation"] is None for g in pages)
    assert pages[0x100]["violations"] == 3  # from the outcomes
    with_log = R.page_stats(hand)[1]
    assert per_subpage.equals(with_log)  # no page-crossing violation here: same pieces


def test_hook_relevance_per_page():
    vm = sppjit.VM(memory="16MiB")
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    maps = ranges_to_maps(hook)
    vm.protect(maps.gfn, maps.access)
    trace = {"gpa": np.array([PAGE + 124, PAGE + 200, PAGE + 1000], dtype=np.uint64)}
    res = replay(vm, trace, engine="reference", hooks=hook)
    stats = R.analyze(res)
    page = by_gfn(stats.per_page)[0x100]
    assert (page["relevant"], page["irrelevant"], page["violations"]) == (1, 1, 2)
    assert stats.totals["hooks"] == {"relevant": 1, "irrelevant": 1}
    assert "relevant" not in R.page_stats(hand_replay())[0].column_names


def test_streaming_merge_equals_one_batch(monkeypatch):
    """Many small batches, merged through every path of the running group-by, give the same
    tables as one batch; and they match a brute-force count."""
    rng = np.random.default_rng(7)
    n = 3000
    gpa = (PAGE + rng.integers(0, 40 * 4096, n)).astype(np.uint64)
    size = rng.choice(np.array([1, 8, 100, 300, 4096], dtype=np.uint16), n)
    kind = rng.choice(np.array([0, 1, 1, 2], dtype=np.uint8), n)
    vm = sppjit.VM(memory="64MiB", profile="v12")
    vm.init_spp()
    vm.set_subpages(0x100, rng.integers(0, 1 << 32, 40, dtype=np.uint64).astype(np.uint32))
    res = vm.replay({"gpa": gpa, "size": size, "kind": kind}, engine="reference")
    whole = R.analyze(res, epochs=10)
    monkeypatch.setattr(R, "COMPACT_ROWS", 3)
    small = R.analyze(res, epochs=10, batch_size=37)
    assert small.per_page.equals(whole.per_page)
    assert small.per_subpage.equals(whole.per_subpage)
    assert small.epochs.equals(whole.epochs)

    writes = {}
    for a, s, k in zip(gpa.tolist(), size.tolist(), kind.tolist()):
        if k == 1:
            for q in range(a >> 7, ((a + s - 1) >> 7) + 1):
                writes[q] = writes.get(q, 0) + 1
    got = {(r["gfn"] << 5) | r["subpage"]: r["writes"]
           for r in whole.per_subpage.to_pylist() if r["writes"]}
    assert got == writes
    accesses = {}
    for a, s in zip(gpa.tolist(), size.tolist()):
        for g in range(a >> 12, ((a + s - 1) >> 12) + 1):
            accesses[g] = accesses.get(g, 0) + 1
    assert {r["gfn"]: r["accesses"] for r in whole.per_page.to_pylist()} == accesses
    assert int(whole.per_page.column("exits").to_numpy().sum()) == res.exits.num_rows


def test_inputs_in_every_format_read_alike(hand, files, tmp_path):
    with ipc.new_stream(str(tmp_path / "r.arrows"), hand.table.schema) as w:
        w.write_table(hand.table)
    pq.write_table(hand.exits, tmp_path / "e.parquet")
    a = R.page_stats(str(files / "r.parquet"), str(files / "e.arrow"))
    b = R.page_stats(str(tmp_path / "r.arrows"), str(tmp_path / "e.parquet"))
    c = R.page_stats(hand)
    assert a[0].equals(b[0]) and a[0].equals(c[0]) and a[1].equals(b[1]) and a[1].equals(c[1])


def test_mismatched_inputs_are_refused(hand, tmp_path):
    with pytest.raises(sppjit.InputError, match="no column 'outcome'"):
        R.analyze(pa.table({"gpa": pa.array([1], pa.uint64())}))
    shifted = hand.exits.set_column(
        hand.exits.schema.get_field_index("gpa"), "gpa",
        pa.array([g + 4096 for g in hand.exits.column("gpa").to_pylist()], pa.uint64()))
    with pytest.raises(sppjit.InputError, match="not from the same replay"):
        R.analyze(hand.table, shifted)
    unsorted = hand.exits.take([1, 0, 2, 3, 4, 5]).set_column(
        0, "row", pa.array([4, 0, 1, 4, 5, 6], pa.int64()))
    with pytest.raises(sppjit.InputError, match="not in trace order"):
        R.analyze(hand.table, unsorted)
    filtered = hand.exits.slice(0, 3)
    assert R.analyze(hand.table, filtered).warnings  # a filtered log is allowed, with a note


# ------------------------------------------------------------------------------ plots

def png_checks(path, width=1200, height=800):
    """The PNG exists, has the size asked for, and is not blank."""
    mpimg = pytest.importorskip("matplotlib.image")
    image = mpimg.imread(path)
    assert image.shape[:2] == (height, width), image.shape
    assert float(image[..., :3].var()) > 0
    rgb = np.round(image[..., :3] * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert colours.shape[0] > 10
    return image


def test_plots_have_their_size_and_are_not_blank(hand, tmp_path):
    pytest.importorskip("matplotlib")
    stats = R.analyze(hand, epochs=7)
    p1 = R.plot_exits_over_time(stats.epochs, tmp_path / "exits.png")
    p2 = R.plot_violations_heatmap(stats.per_subpage, tmp_path / "heat.png", per_page=stats.per_page)
    assert p1 == str(tmp_path / "exits.png") and p2 == str(tmp_path / "heat.png")
    png_checks(p1)
    image = png_checks(p2)
    # the heatmap paints its cells: some pixels are strongly coloured (YlOrRd), not grey
    rgb = image[..., :3]
    assert ((rgb[..., 0] - rgb[..., 2]) > 0.3).any()
    # the ranking and the matrix behind it
    gfns, totals, matrix = R.heatmap_matrix(stats.per_subpage, per_page=stats.per_page)
    assert gfns.tolist() == [0x100] and totals.tolist() == [3]
    assert matrix[0, :4].tolist() == [2, 2, 1, 0] and matrix.sum() == 5
    # without per_page, the ranking is by the sub-pages' sum
    assert R.heatmap_matrix(stats.per_subpage)[1].tolist() == [5]


def test_plots_without_exits_or_violations_are_still_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    vm = sppjit.VM(memory="16MiB")
    res = vm.replay({"gpa": np.array([0x1000, 0x1000], dtype=np.uint64)}, engine="reference")
    stats = R.analyze(res.table)  # no log: one "all kinds" series
    png_checks(R.plot_exits_over_time(stats.epochs, tmp_path / "e.png"))
    png_checks(R.plot_violations_heatmap(stats.per_subpage, tmp_path / "h.png"))


def hand_trace() -> dict:
    return {"gpa": np.array(GPA, dtype=np.uint64), "size": np.array(SIZE, dtype=np.uint16),
            "kind": np.array(KIND, dtype=np.uint8)}


def hand_maps():
    from sppjit.io.protect import AccessMaps

    return AccessMaps(gfn=np.array([0x100], dtype=np.uint64),
                      access=np.array([0xFFFFFFFC], dtype=np.uint32))


@functools.cache
def _compare_json() -> str:
    from sppjit.compare import compare

    doc = compare(hand_trace(), hand_maps(), memory="64MiB", engine="reference")
    doc["input"] = dict(doc["input"], path="trace.parquet")
    # its configurations named as a person would (the report shows the names it is given)
    names = {"page": "page", "spp_v4": "SPP v4", "spp_v12": "SPP v12"}
    for config in doc["configs"]:
        config["name"] = names[config["name"]]
    return json.dumps(doc)


def compare_document() -> dict:
    """A compare document of sppjit compare: the hand trace under the hand protection,
    page, SPP v4 and SPP v12 (a fresh copy each time)."""
    return json.loads(_compare_json())


def test_compare_bars(tmp_path):
    pytest.importorskip("matplotlib")
    COMPARE = compare_document()
    assert [name for name, _ in R.compare_configs(COMPARE)] == ["page", "SPP v4", "SPP v12"]
    path = R.plot_compare_bars(COMPARE, tmp_path / "bars.png")
    png_checks(path)
    (tmp_path / "c.json").write_text(json.dumps(COMPARE))
    png_checks(R.plot_compare_bars(str(tmp_path / "c.json"), tmp_path / "bars2.png"))
    with pytest.raises(sppjit.InputError, match="not a compare document"):
        R.plot_compare_bars({"exits": {}}, tmp_path / "x.png")
    with pytest.raises(sppjit.InputError, match="no \"exits\""):
        R.compare_configs({"configs": [{"name": "a"}]})


def test_missing_matplotlib_is_a_clear_input_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    # run from the checkout (as the suite is): the editable install's hint
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(sppjit.__file__))))
    with pytest.raises(sppjit.InputError) as info:
        R.require_matplotlib()
    assert str(info.value) == ("sppjit report --plot and --html need matplotlib: "
                               "pip install -e '.[plot]'")


def test_matplotlib_hint_follows_the_installation(monkeypatch, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(sppjit.__file__)))
    monkeypatch.chdir(tmp_path)  # a checkout, used from elsewhere: its path
    assert R.install_hint() == f"pip install -e '{root}[plot]'"
    site = tmp_path / "site-packages" / "sppjit"  # a wheel: no pyproject.toml beside it
    site.mkdir(parents=True)
    monkeypatch.setattr(sppjit, "__file__", str(site / "__init__.py"))
    assert R.install_hint() == "pip install 'sppjit[plot]'"


# ------------------------------------------------------------------------------ command line

def invoke(*args):
    return runner.invoke(app, ["report", *[str(a) for a in args]])


def sha256(path) -> str:
    """The digest report.json records: BLAKE3 (the name kept from when it was SHA-256)."""
    return "blake3:" + pytest.importorskip("blake3").blake3(path.read_bytes()).hexdigest()


def test_cli_writes_stats_plots_and_a_reproducible_report(files, tmp_path):
    pytest.importorskip("matplotlib")
    stats_dir, plot_dir = tmp_path / "stats", tmp_path / "plots" / "deep"
    result = invoke(files / "r.parquet", "--exits", files / "e.arrow", "--summary",
                    files / "s.json", "--stats", stats_dir, "--plot", plot_dir,
                    "--epochs", 5, "--top", 4)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "top pages by exits" in out and "0x100" in out and "total 6" in out
    assert "per_page.parquet" in out and "violations_heatmap.png" in out
    assert sorted(os.listdir(stats_dir)) == ["epochs.parquet", "per_page.parquet",
                                             "per_subpage.parquet", "report.json"]
    assert sorted(os.listdir(plot_dir)) == ["exits_over_time.png", "report.json",
                                            "violations_heatmap.png"]
    per_page = pq.read_table(stats_dir / "per_page.parquet")
    assert by_gfn(per_page)[0x100]["spp_violation"] == 3
    assert pq.read_table(stats_dir / "epochs.parquet").num_rows == 5
    for png in ("exits_over_time.png", "violations_heatmap.png"):
        png_checks(plot_dir / png)
    doc = json.loads((stats_dir / "report.json").read_text())
    assert doc["schema_version"] == 1
    assert set(doc["versions"]) >= {"sppjit", "numba", "pyarrow", "matplotlib"}
    assert doc["versions"]["sppjit"] == sppjit.__version__
    for key, name in (("results", "r.parquet"), ("exits", "e.arrow"), ("summary", "s.json")):
        assert doc["inputs"][key]["path"] == str(files / name)
        assert doc["inputs"][key]["digest"] == sha256(files / name)
    assert doc["source"]["seed"] == 42
    assert doc["source"]["config"]["granularity"] == "spp"
    assert doc["options"] == {"epochs": 5, "epochs_used": 5, "top": 4}
    assert doc["totals"]["exits"]["total"] == 6
    assert doc["top_pages"][0]["gfn"] == "0x100"
    assert doc["outputs"] == ["per_page.parquet", "per_subpage.parquet", "epochs.parquet"]
    plot_doc = json.loads((plot_dir / "report.json").read_text())
    assert plot_doc["outputs"] == ["exits_over_time.png", "violations_heatmap.png"]


def test_cli_compare_document_adds_the_bars(files, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "c.json").write_text(json.dumps(compare_document()))
    result = invoke(files / "r.parquet", "--summary", tmp_path / "c.json", "--plot", tmp_path)
    assert result.exit_code == 0, result.output
    png_checks(tmp_path / "compare_bars.png")
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["source"]["kind"] == "compare"
    assert doc["source"]["configs"] == ["page", "SPP v4", "SPP v12"]
    assert doc["inputs"]["exits"] is None


def test_cli_text_only_writes_nothing(files, tmp_path):
    result = invoke(files / "r.parquet")
    assert result.exit_code == 0, result.output
    assert "kinds: give --exits" in result.stdout and "wrote" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["missing.parquet"], "results: no such file: missing.parquet"),
    (["{r}", "--exits", "missing.arrow"], "exits: no such file: missing.arrow"),
    (["{r}", "--summary", "{bad}"], "is not JSON"),
    (["{r}", "--stats", "{r}"], "exists and is not a directory"),
    (["{r}", "--epochs", "0"], "--epochs"),
    (["{s}"], "s.json"),
])
def test_cli_bad_input_exits_2_with_one_line(files, tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{nope")
    subst = {"r": files / "r.parquet", "bad": tmp_path / "bad.json", "s": files / "s.json"}
    args = [a.format(**subst) for a in args]
    before = sorted(os.listdir(files))
    result = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppjit: error: "), result.stderr
    assert message in lines[0]
    assert sorted(os.listdir(files)) == before


@pytest.mark.parametrize("doc, message", [
    ({"input": [7]}, '"input" is a JSON array, not an object'),
    ({"input": "t.parquet"}, '"input" is a JSON string, not an object'),
    ({"config": ["profile", "granularity"]}, '"config" is a JSON array, not an object'),
    ({"config": 4}, '"config" is a JSON number, not an object'),
    ({"configs": [{"name": "a", "exits": {"total": "many"}}]}, "has no exit counts"),
    ({"configs": [{"name": "a", "exits": 3}]}, 'has no "exits" object'),
    ({"configs": 3}, '"configs" must be a list or an object'),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_cli_summary_of_the_wrong_shape_exits_2_with_one_line(files, tmp_path, doc, message):
    """A --summary that is JSON but not a summary's shape: one line, exit 2,
    before any work and with nothing written (these used to end in an internal error)."""
    path = tmp_path / "summary.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    out = tmp_path / "stats"
    result = invoke(files / "r.parquet", "--exits", files / "e.arrow", "--summary", path,
                    "--stats", out)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppjit: error: summary: "), result.stderr
    assert message in lines[0]
    assert result.stdout == "" and not out.exists()


def test_the_package_loads_its_modules_on_first_use():
    """Importing sppjit.report (the command line does, for its defaults) loads no pyarrow;
    every name it exports resolves."""
    import subprocess
    import sys

    code = ("import sys, sppjit.report as R; R.DEFAULT_TOP, R.STATS_FILES; "
            "assert 'pyarrow' not in sys.modules, 'pyarrow loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in R.__all__:
        assert getattr(R, name) is not None, name


def test_find_seed_is_depth_first_and_survives_any_depth():
    assert R.find_seed({"a": {"seed": None, "b": {"seed": 1}}, "c": [{"seed": 2}]}) == 2
    assert R.find_seed({"input": {"seed": 3}, "generator": {"seed": 4}}) == 3
    deep: dict = {"seed": 5}
    for _ in range(10_000):
        deep = {"x": [deep]}
    assert R.find_seed(deep) == 5


def test_write_report_is_the_command(files, tmp_path):
    """The command is a thin shell: write_report writes the same files, and its text is what
    the command prints."""
    a, b = tmp_path / "a", tmp_path / "b"
    result = invoke(files / "r.parquet", "--exits", files / "e.arrow", "--summary",
                    files / "s.json", "--stats", a)
    assert result.exit_code == 0, result.output
    done = R.write_report(str(files / "r.parquet"), str(files / "e.arrow"),
                          summary=str(files / "s.json"), stats=str(b))
    assert result.stdout == done.text.replace(str(b), str(a))
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == sorted(
        [*R.STATS_FILES.values(), R.REPORT_FILE])
    for name in R.STATS_FILES.values():
        assert pq.read_table(a / name).equals(pq.read_table(b / name))
    doc_a, doc_b = (json.loads((d / R.REPORT_FILE).read_text()) for d in (a, b))
    assert doc_a == doc_b


def test_cli_refuses_to_overwrite_an_input(files, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "per_page.parquet").write_bytes((files / "r.parquet").read_bytes())
    result = invoke(d / "per_page.parquet", "--stats", d)
    assert result.exit_code == 2
    assert "same file" in result.stderr


def test_a_failed_run_leaves_no_file_and_no_directory_it_created(files, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from sppjit.commands.report import run_report
    from sppjit.report import plots

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "plot_violations_heatmap", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_report(results=str(files / "r.parquet"), exits=str(files / "e.arrow"),
                   stats=str(tmp_path / "a" / "stats"), plot=str(tmp_path / "plots"))
    assert os.listdir(tmp_path) == []


def test_compare_bars_from_a_real_compare_document(tmp_path):
    pytest.importorskip("matplotlib")
    from sppjit.compare import compare
    from sppjit.io.protect import AccessMaps

    trace = {"gpa": np.array(GPA, dtype=np.uint64), "size": np.array(SIZE, dtype=np.uint16),
             "kind": np.array(KIND, dtype=np.uint8)}
    maps = AccessMaps(gfn=np.array([0x100], dtype=np.uint64),
                      access=np.array([0xFFFFFFFC], dtype=np.uint32))
    doc = compare(trace, maps, memory="64MiB", engine="reference")
    configs = dict(R.compare_configs(doc))
    assert list(configs) == [c["name"] for c in doc["configs"]]
    for config in doc["configs"]:
        assert configs[config["name"]] == config["summary"]["exits"]
    png_checks(R.plot_compare_bars(doc, tmp_path / "bars.png"))


# ------------------------------------------------------------- plots a reader can compare

def hook_replay():
    """The hook of test_hook_relevance_per_page (16 bytes at offset 120: sub-pages 0 and 1)
    and writes at 124 (on it: relevant, sub-pages 0 and 1), 200 (sub-page 1, off it:
    irrelevant) and 1000 (sub-page 7: allowed)."""
    vm = sppjit.VM(memory="16MiB")
    hook = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                      length=np.array([16], dtype=np.uint32), name=["cred"])
    maps = ranges_to_maps(hook)
    vm.protect(maps.gfn, maps.access)
    trace = {"gpa": np.array([PAGE + 124, PAGE + 200, PAGE + 1000], dtype=np.uint64)}
    return hook, replay(vm, trace, engine="reference", hooks=hook)


def test_hook_relevance_per_subpage_by_hand():
    _, res = hook_replay()
    stats = R.analyze(res)
    got = {r["subpage"]: (r["violations"], r["relevant"], r["irrelevant"])
           for r in stats.per_subpage.to_pylist() if r["violations"]}
    assert got == {0: (1, 1, 0), 1: (2, 1, 1)}
    assert "relevant" not in R.page_stats(hand_replay())[1].column_names


def test_subpage_marks_protected_and_hooked():
    hook, _ = hook_replay()
    gfns = np.array([0x200, 0x100], dtype=np.uint64)  # ranked order: 0x100 is the second row
    protected, hooked = R.subpage_marks(gfns, hook)
    assert np.flatnonzero(protected[1]).tolist() == [0, 1]
    assert np.flatnonzero(hooked[1]).tolist() == [0, 1]
    assert not protected[0].any() and not hooked[0].any()
    from sppjit.io.protect import AccessMaps

    maps = AccessMaps(gfn=np.array([0x100], dtype=np.uint64),
                      access=np.array([0xFFFFFFFF & ~(1 << 5) & ~(1 << 31)], dtype=np.uint32))
    protected, hooked = R.subpage_marks(gfns, maps)
    assert np.flatnonzero(protected[1]).tolist() == [5, 31] and not hooked.any()
    assert not R.subpage_marks(gfns, None)[0].any()


def test_heatmap_with_hooks_and_marks_is_drawn(tmp_path):
    hook, res = hook_replay()
    stats = R.analyze(res)
    path = R.plot_violations_heatmap(stats.per_subpage, tmp_path / "h.png",
                                     per_page=stats.per_page, protection=hook,
                                     about="t.parquet: SPP v4")
    image = png_checks(path)
    # the outline of the protected sub-pages: dark blue (#1a365d) pixels
    rgb = np.round(image[..., :3] * 255).astype(int)
    assert (np.abs(rgb - [0x1a, 0x36, 0x5d]).sum(axis=2) < 30).sum() > 50


def test_titles_name_the_trace_and_configuration(hand):
    from sppjit.compare import compare as compare_trace
    from sppjit.compare import default_configs

    def replayed(path, **config):  # the hand replay's summary, as if of another VM
        return dict(hand.summary, input={"path": path},
                    config=dict(hand.summary["config"], **config))

    summary = replayed("/data/t.parquet", profile="v12", granularity="spp",
                       subpage_check="first", vcpus=4)
    assert R.describe(summary, "r.parquet") == "t.parquet: SPP v12, sub-page check first, 4 vCPUs"
    page = replayed("t.parquet", granularity="page", vcpus=1)
    assert R.describe(page) == "t.parquet: page-granular protection, 1 vCPU"
    assert R.describe(None, "/x/r.parquet") == "r.parquet"
    compare = compare_trace(hand_trace(), hand_maps(), memory="64MiB", vcpus=2, engine="reference",
                            configs=default_configs()[:2])  # page, spp_v4
    compare["input"] = dict(compare["input"], path="t.parquet")
    assert R.describe(compare) == "t.parquet: page, spp_v4; 2 vCPUs"
    assert R.describe(compare, "r.parquet") == ("r.parquet, a replay of t.parquet "
                                                "(compared: page, spp_v4; 2 vCPUs)")


def test_compare_chart_figures_from_a_real_document(tmp_path):
    from sppjit.compare import compare

    hook, _ = hook_replay()
    trace = {"gpa": np.array([PAGE + 124, PAGE + 200, PAGE + 1000], dtype=np.uint64)}
    doc = compare(trace, hook, memory="16MiB", engine="reference")
    figures = {f["name"]: f for f in R.compare_figures(doc)}
    for c in doc["configs"]:
        f, d = figures[c["name"]], c["derived"]
        assert f["protection_exits"] == d["protection_exits"]
        assert (f["relevant"], f["irrelevant"]) == (d["hooks"]["relevant"],
                                                    d["hooks"]["irrelevant"])
        assert f["overhead"] == d["total_overhead_seconds"]
        assert f["is_baseline"] == (c["name"] == "page")
    assert figures["spp_v4"]["change_exits"] == pytest.approx(-1 / 3)  # 2 against page's 3
    png_checks(R.plot_compare_bars(doc, tmp_path / "bars.png"))


def test_report_marks_the_protection_the_summary_names(files, tmp_path):
    """The heatmap's protection: --protect, else the summary's file while its digest holds;
    a changed file is not used, and a note says so."""
    import hashlib as _h

    protect = tmp_path / "p.parquet"
    pq.write_table(pa.table({"gfn": pa.array([0x100], pa.uint64()),
                             "access": pa.array([0xFFFFFFFC], pa.uint32())}), protect)
    summary = json.loads((files / "s.json").read_text())
    summary["config"]["protection"] = {"path": str(protect), "form": "access_maps", "pages": 1}
    digest = "sha256:" + _h.sha256(protect.read_bytes()).hexdigest()
    summary["provenance"] = {"digests": {"protect": digest}}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    from sppjit.report import writing

    used, note = writing._protection(None, summary)
    assert note is None and used.gfn.tolist() == [0x100]
    summary["provenance"]["digests"]["protect"] = "sha256:" + "0" * 64
    used, note = writing._protection(None, summary)
    assert used is None and "give --protect" in note
    done = R.write_report(str(files / "r.parquet"), str(files / "e.arrow"),
                          summary=str(tmp_path / "s.json"), plot=str(tmp_path / "plots"))
    assert any("give --protect" in n for n in done.notes) is False  # the digest matched
    assert writing._protection(str(protect), None)[0].gfn.tolist() == [0x100]


def test_output_directories_are_created_or_named_in_the_error(files, tmp_path):
    """--plot and --stats create their directory (nested levels too); where one cannot be a
    directory the error names the option. bench --workdir does the same."""
    from sppjit.bench import run_end_to_end

    made = tmp_path / "a" / "b" / "plots"
    result = invoke(files / "r.parquet", "--exits", files / "e.arrow", "--plot", made)
    assert result.exit_code == 0, result.output
    assert (made / "violations_heatmap.png").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for option in ("--plot", "--stats"):
        result = invoke(files / "r.parquet", option, blocker)
        assert result.exit_code == 2
        assert f"{option}: {blocker} exists and is not a directory" in result.output
    with pytest.raises(sppjit.InputError, match="--workdir: cannot create"):
        run_end_to_end(accesses=10, workdir=str(blocker / "sub"))


def test_compare_chart_with_two_protections_names_each_baseline(tmp_path):
    from sppjit.compare import compare

    a = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64),
                   length=np.array([16], dtype=np.uint32), name=["a"])
    b = ByteRanges(gpa=np.array([PAGE + 1024], dtype=np.uint64),
                   length=np.array([8], dtype=np.uint32), name=["b"])
    trace = {"gpa": np.array([PAGE + 124, PAGE + 200, PAGE + 1028], dtype=np.uint64)}
    doc = compare(trace, [a, b], memory="16MiB", engine="reference")
    figures = {f["name"]: f for f in R.compare_figures(doc)}
    assert [n for n, f in figures.items() if f["is_baseline"]] == ["page@p1", "page@p2"]
    assert R.describe(doc) == "an in-memory trace: 6 configurations; 1 vCPU"
    png_checks(R.plot_compare_bars(doc, tmp_path / "bars.png"))


def test_help_names_the_plot_extra_and_the_new_options():
    out = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"}).stdout
    assert "pip install 'sppjit[plot]'" in out and "pip install -e '.[plot]'" in out
    assert "--html" in out and "--protect" in out


def test_library_errors_name_parameters_and_the_command_its_options(files, tmp_path):
    """write_report names its parameters (epochs, plot, results); sppjit report, through
    names=OPTION_NAMES, the options the user typed (--epochs, --plot, RESULTS)."""
    from sppjit.commands.report import run_report

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r, e = str(files / "r.parquet"), str(files / "e.arrow")
    with pytest.raises(sppjit.InputError) as library:
        R.write_report(r, epochs=0)
    with pytest.raises(sppjit.InputError) as command:
        run_report(results=r, epochs=0)
    assert str(library.value).startswith("epochs must be 1..")
    assert str(command.value).startswith("--epochs must be 1..")
    with pytest.raises(sppjit.InputError) as library:
        R.write_report(r, plot=str(blocker))
    assert str(library.value) == f"plot: {blocker} exists and is not a directory"
    with pytest.raises(sppjit.InputError) as library:
        R.write_report(None, e)
    assert str(library.value).startswith("results is missing: ")
    assert "or exits and summary for a report" in str(library.value)
    with pytest.raises(sppjit.InputError) as command:
        run_report(results=None, exits=e)
    assert str(command.value).startswith("RESULTS is missing: ")
    assert "or --exits and --summary for a report" in str(command.value)
    with pytest.raises(sppjit.InputError) as library:
        R.write_report(r, r)
    assert str(library.value) == f"exits: {r} is the same file as results"
    with pytest.raises(sppjit.InputError) as command:
        run_report(results=r, exits=r)
    assert str(command.value) == f"--exits: {r} is the same file as RESULTS"


def test_the_summary_is_read_typed_and_a_missing_key_is_named(files, tmp_path):
    """read_summary gives the typed document (to_dict: the JSON back, key for key); a
    summary that lacks a key of the contract is one line naming it, exit 2, nothing written."""
    from sppjit.summary import CompareDocument, ReplaySummary

    summary = R.read_summary(str(files / "s.json"))
    assert isinstance(summary, ReplaySummary)
    assert summary.to_dict() == json.loads((files / "s.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps(compare_document()))
    assert isinstance(R.read_summary(str(tmp_path / "c.json")), CompareDocument)
    for key in ("counts", "engine"):
        doc = {k: v for k, v in json.loads((files / "s.json").read_text()).items() if k != key}
        path = tmp_path / f"no-{key}.json"
        path.write_text(json.dumps(doc))
        out = tmp_path / f"stats-{key}"
        result = invoke(files / "r.parquet", "--summary", path, "--stats", out)
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sppjit: error: summary: {path}: ")
        assert f"missing key '{key}'" in lines[0]
        assert not out.exists()
    compare = compare_document()
    del compare["configs"][1]["derived"]["sppt_bytes"]
    with pytest.raises(sppjit.InputError, match=r"configs\[1\]\.derived: missing key 'sppt_bytes'"):
        R.compare_figures(compare)
