"""The docs' figures and tables read at 1280 px: labels beside the points they name, tables narrow enough to show
every column, and noise-sized timings shown as noise, not as results."""

from __future__ import annotations

import importlib.util
import itertools
import json
import pathlib
import re

import pytest

matplotlib = pytest.importorskip("matplotlib")  # the docs extra
matplotlib.use("Agg")
from matplotlib.text import Text  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mc():
    return _load("method_comparison_for_figures", ROOT / "benchmarks" / "method_comparison.py")


@pytest.fixture(scope="module")
def figures():
    return _load("make_figures_under_test", ROOT / "docs" / "figures" / "make_figures.py")


def _label_geometry(fig, labels):
    fig.canvas.draw()  # at the figure's own dpi, as the labels were placed (savefig drew at another)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    out = []
    for ann in labels:
        box = Text.get_window_extent(ann, renderer)  # the text alone, without its leader line
        anchor = ax.transData.transform(ann.xy)
        out.append((ann, box, anchor))
    return out


def _check_labels(fig, labels, points) -> None:
    geometry = _label_geometry(fig, labels)
    ax = fig.axes[0]
    dots = {xy: ax.transData.transform(xy) for xy in points}
    # one label per point, anchored at that point
    assert sorted(tuple(a.xy) for a in labels) == sorted(points)
    for (a, box_a, _), (b, box_b, _) in itertools.combinations(geometry, 2):
        overlap = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0), min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert min(overlap) <= 0.5, f"labels overlap: {a.get_text()!r} and {b.get_text()!r}"
    for ann, box, anchor in geometry:
        for xy, (x, y) in dots.items():
            if xy != tuple(ann.xy):
                assert not (box.x0 - 2 <= x <= box.x1 + 2 and box.y0 - 2 <= y <= box.y1 + 2), \
                    f"label {ann.get_text()!r} covers the point {xy}"
        # where the label starts (the side facing its point), its own point is the nearest one, or a leader line
        # joins the two
        edge = (box.x0 if ann.get_ha() == "left" else box.x1, (box.y0 + box.y1) / 2)
        dist = {xy: ((x - edge[0]) ** 2 + (y - edge[1]) ** 2) ** 0.5 for xy, (x, y) in dots.items()}
        own = dist[tuple(ann.xy)]
        assert own <= min(dist.values()) + 1e-6 or ann.arrow_patch is not None, \
            f"label {ann.get_text()!r} sits nearer another point, with no leader line to its own"


def test_method_comparison_labels_sit_beside_their_own_points(mc, tmp_path):
    data = json.loads((ROOT / "benchmarks" / "results" / "method_comparison.json").read_text())
    fig, labels = mc.plot(data, str(tmp_path / "plot.png"))
    points = {(r["params"], round(100 * r["after"], 1)) for n, r in data["rows"].items() if n != "base model"}
    _check_labels(fig, labels, points)
    # each label names its own point's score
    for ann in labels:
        assert ann.get_text().endswith(f"({ann.xy[1]:.1f}%)")


def test_crowded_points_get_separate_ordered_labels(mc, tmp_path):
    rows = {"base model": {"row": "base model", "params": 0, "after": 0.1}}
    names = mc.ROW_NAMES[1:]
    spots = [(60_000, 0.69), (60_000, 0.66), (60_000, 0.64), (90_000, 0.633), (160_000, 0.66), (300_000, 0.72),
             (460_000, 0.69), (535_000, 0.68), (1_840_000, 0.72), (2_000_000, 0.70), (60_000, 0.025)]
    for name, (params, after) in zip(names, spots):
        rows[name] = {"row": name, "params": params, "after": after}
    data = {"meta": {"steps": 1, "batch_size": 1}, "rows": rows}
    fig, labels = mc.plot(data, str(tmp_path / "crowded.png"))
    _check_labels(fig, labels, {(p, round(100 * a, 1)) for p, a in spots})


def test_a_run_of_the_base_model_alone_still_draws(mc, tmp_path):
    # each row's own process draws the plot of what the JSON holds so far, which may be the base model only
    data = {"meta": {"steps": 2, "batch_size": 8}, "rows": {"base model": {"row": "base model", "params": 0,
                                                                         "after": 0.0}}}
    fig, labels = mc.plot(data, str(tmp_path / "base.png"))
    assert labels == [] and (tmp_path / "base.png").is_file()


def _tables(text: str) -> list[tuple[int, int]]:
    """``(line, columns)`` of each Markdown table's header row."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        if line.lstrip().startswith("|") and re.fullmatch(r"\s*\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*", lines[i + 1]):
            out.append((i + 1, len(line.strip().strip("|").split("|"))))
    return out


def test_no_page_holds_a_table_wider_than_a_page_shows(figures):
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    wide = [f"{p.relative_to(ROOT)}:{line}: {cols} columns" for p in pages
            for line, cols in _tables(p.read_text(encoding="utf-8")) if cols > figures.MAX_TABLE_COLUMNS]
    assert not wide, f"tables wider than {figures.MAX_TABLE_COLUMNS} columns:\n" + "\n".join(wide)
    assert _tables("| a | b |\n|---|---:|\n| 1 | 2 |\n") == [(1, 2)]


def test_the_table_writer_refuses_a_wider_table(figures):
    with pytest.raises(figures.TableTooWide, match="split it"):
        figures.markdown_table([f"c{i}" for i in range(figures.MAX_TABLE_COLUMNS + 1)], [])


def test_whole_model_overheads_within_the_spread_are_not_results(figures):
    data = json.loads((ROOT / "benchmarks" / "results" / "models.json").read_text())
    body = figures.bench_models(data, name="models_under_test")
    (figures.HERE / "bench_models_under_test.png").unlink()
    train = body.split("Inference and memory:")[0]
    rows = [line.strip().strip("|").split("|") for line in train.splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in rows[0]], rows[1:]
    column = header.index("over frozen ms")
    cells = [row[column].strip() for row in rows]
    assert cells
    for cell in cells:
        if cell == "-" or cell.startswith("within noise ("):
            continue
        value, spread = (float(x.replace(",", "")) for x in cell.split(" ± "))
        assert value > spread > 0, cell
    # the table of record: BERT's BOFT m=2 (-123.2 ms) and LoRA (-46.9 ms) are noise, not speed-ups
    assert "within noise (-123.2 ± " in body and "within noise (-46.9 ± " in body


def test_run_line_says_thread_in_the_singular(figures):
    assert "1 thread." in figures.describe_run({"meta": {"threads": 1}, "torch": "2"})
    assert "2 threads." in figures.describe_run({"meta": {"threads": 2}, "torch": "2"})
