"""`longtail report`: the HTML renders from tiny runs, every figure decodes (and loads in
headless Chromium when one is installed), and the numbers shown are the run files'."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_arrays, tiny_config
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.report import build_report
from longtail.report.figures import ordered_confusion
from longtail.report.rundata import run_labels
from longtail.runs import evaluate_run, train_run

RUN_FIGURES = {"count_histogram", "accuracy_vs_frequency", "group_bars", "confusion", "reliability",
               "training_curves"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CE run with a validation split and post-hoc LA, and a tau_norm run on it (no epochs)."""
    root = tmp_path_factory.mktemp("report_runs")
    arrays = tiny_arrays()
    cfg = tiny_config(**{"data.val_per_class": 2, "train.epochs": 2})
    train_run(config_from_dict(cfg), root / "ce", arrays=arrays)
    evaluate_run(root / "ce", logit_adjust_tau=1.0)
    stage2 = tiny_config(**{"data.val_per_class": 2, "method.name": "tau_norm",
                            "method.params": {"stage1": str(root / "ce/checkpoints/last.pt")}})
    train_run(config_from_dict(stage2), root / "tau_norm", arrays=arrays)
    return root


class Page(HTMLParser):
    """Collects <img> sources, data-figure names and the text of the page."""

    def __init__(self):
        super().__init__()
        self.images, self.figures, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "figure":
            self.figures.append(a.get("data-figure"))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def decode_all(page: Page) -> list[tuple[int, int]]:
    sizes = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            im.load()  # decodes every pixel: a truncated PNG fails here
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            sizes.append(im.size)
    return sizes


@pytest.fixture(scope="module")
def one_report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    info = build_report([runs / "ce"], out)
    return out, info


def test_report_of_a_tiny_run(runs, one_report):
    out, info = one_report
    page = parse(out)
    assert info["figures"] == 6 and info["runs"] == 1
    assert sorted(page.figures) == sorted(RUN_FIGURES)
    assert len(decode_all(page)) == 6
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    text = " ".join(page.text)
    ev = json.loads((runs / "ce/eval.json").read_text())
    la = json.loads((runs / "ce/eval_logit_adjusted.json").read_text())
    for value in (ev["top1"], ev["medium"], ev["best_val"]["top1"], la["top1"]):
        assert f"{value:.2f}" in text
    assert f"{ev['mcc']:.4f}" in text and f"ECE {ev['ece']:.4f}" in text
    assert "2 epochs configured, 2 recorded in metrics.jsonl" in text
    assert f"after epoch {ev['epoch']}" in text and f"best on validation: after epoch {ev['best_val']['epoch']}" in text
    assert "post-hoc logit adjustment (tau 1.0)" in text
    assert "many n > 100 (0 classes)" in text  # tiny counts are 40 ... 10: no many class, shown as '-'


def test_report_compares_runs_and_handles_post_hoc(runs, tmp_path, capsys):
    out = tmp_path / "both.html"
    assert main(["report", str(runs / "ce"), str(runs / "tau_norm"), "--out", str(out), "--title", "two"]) == 0
    assert f"wrote {out}: 2 run(s), 14 figures embedded" in capsys.readouterr().out
    page = parse(out)
    assert page.figures[:3] == ["compare_group_bars", "compare_training_curves", "compare_accuracy_vs_frequency"]
    assert page.figures.count("training_curves") == 1  # the post-hoc run has no epochs
    assert len(decode_all(page)) == 14
    text = " ".join(page.text)
    assert "Comparison" in text and "Best on validation, test set" in text
    assert "a post-hoc method trains no epochs" in text
    posthoc = json.loads((runs / "tau_norm/posthoc.json").read_text())
    assert f"tau {posthoc['tau']}" in text
    tau_ev = json.loads((runs / "tau_norm/eval.json").read_text())
    assert f"{tau_ev['top1']:.2f}" in text


def test_confusion_is_ordered_head_to_tail_and_row_normalised():
    confusion = [[1, 1, 0], [0, 3, 1], [2, 0, 0]]
    order, m = ordered_confusion(confusion, train_counts=[5, 50, 5])
    assert order.tolist() == [1, 0, 2]  # class 1 has most images; ties keep class order
    expected = np.array([[3, 0, 1], [1, 1, 0], [0, 2, 0]]) / np.array([[4], [2], [2]])
    np.testing.assert_allclose(m, expected)
    _, empty = ordered_confusion([[0, 0], [1, 1]], train_counts=[2, 1])
    np.testing.assert_allclose(empty, [[0, 0], [0.5, 0.5]])  # a class without test images stays zero


def test_run_labels_strip_the_common_folder():
    assert run_labels(["a/b/ce/seed0", "a/b/focal/seed0"]) == ["ce/seed0", "focal/seed0"]
    assert run_labels(["x/run"]) == ["run"]
    assert run_labels(["x/run", "x/run"]) == ["run", "run (2)"]


def test_report_errors_are_one_line(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs / "ce", broken)
    (broken / "eval.json").unlink()
    assert main(["report", str(broken), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err == f"longtail: error: no eval.json in {broken}: run `longtail eval {broken}` first\n"
    (broken / "eval.json").write_text('{"top1": 50.0}')
    assert main(["report", str(broken), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"longtail: error: eval.json in {broken} lacks 'many'") and err.count("\n") == 1
    assert main(["report", str(runs / "ce"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def test_report_renders_in_headless_chromium(one_report, tmp_path):
    """The page's own script counts the <img> elements that decoded once the window loaded;
    Chromium dumps the DOM after that, and every figure must have loaded."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium: install Debian's chromium (apt-get install chromium chromium-driver) "
                    "to check that the report renders in a browser")
    out, info = one_report

    def figures_loaded(path: Path) -> tuple[int, int]:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
               path.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        body = done.stdout[done.stdout.index("<body"):].split(">", 1)[0]
        attrs = dict(part.split("=", 1) for part in body.split()[1:] if "=" in part)
        return int(attrs["data-figures-loaded"].strip('"')), int(attrs["data-figures-total"].strip('"'))

    assert figures_loaded(out) == (6, 6) and info["figures"] == 6
    # the check can fail: a copy with one figure's data replaced by bytes that are no PNG loads one figure less
    html = out.read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + "AAAA" + html[html.index('"', start):])
    assert figures_loaded(broken) == (5, 6)


def test_undefined_values_print_as_n_a(runs, tmp_path):
    """A NaN in an eval.json written before metrics were strict, and a null group that has classes
    (none with test images), print as 'n/a'; an empty group stays '-'; eval.json warnings are shown."""
    import re

    from longtail.report.tables import fmt, metric_text

    assert fmt(float("nan")) == "n/a" and fmt(float("inf"), "frac") == "n/a" and fmt(None) == "-"
    assert metric_text({"few": None, "groups": {"few": [3]}}, "few") == "n/a"
    assert metric_text({"many": None, "groups": {"many": []}}, "many") == "-"
    run = tmp_path / "old"
    shutil.copytree(runs / "ce", run)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["groups"]["few"] and ev["few"] is not None
    ev["few"] = float("nan")
    ev["warnings"] = ["class 'x' has no test images: its accuracy is undefined"]
    (run / "eval.json").write_text(json.dumps(ev))  # python's default writes NaN
    assert "NaN" in (run / "eval.json").read_text()
    build_report([run], tmp_path / "r.html")
    text = " ".join(parse(tmp_path / "r.html").text)
    assert "n/a" in text and not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "warning (eval.json): class 'x' has no test images" in text


def test_top5_column_only_where_a_run_has_top5():
    """eval.json holds top-5 for 6 classes or more; the table shows the column when a row has it."""
    from longtail.report.tables import metrics_table

    base = {"top1": 40.0, "many": 50.0, "medium": 40.0, "few": 30.0, "mcc": 0.3, "nmi": 0.4, "ece": 0.1}
    with_top5 = metrics_table([("a", {**base, "top5": 87.5}), ("b", base)])
    assert "<th>top-5</th>" in with_top5 and "87.50" in with_top5
    assert with_top5.index("<th>top-1</th>") < with_top5.index("<th>top-5</th>") < with_top5.index("<th>many</th>")
    assert "<th>top-5</th>" not in metrics_table([("a", base)])


# -- the figures' content, read from their matplotlib objects (usability: titles, legends, labels, ratio)


@pytest.fixture
def drawn(monkeypatch):
    """The Figure objects the figure functions draw (captured instead of only their PNG bytes)."""
    from longtail.report import figures

    figs = []
    real = figures.png_bytes
    monkeypatch.setattr(figures, "png_bytes", lambda fig: figs.append(fig) or real(fig))
    return figs


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_training_curve_panels_have_titles(drawn):
    from longtail.report import figures

    rows = [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "train_top1": 50.0 + e, "val_top1": 40.0 + e,
             "val_many": 60.0, "val_medium": 40.0, "val_few": 10.0, "images_per_s": 100.0} for e in (1, 2, 3)]
    figures.training_curves(metrics=rows)
    titles = [ax.get_title() for ax in drawn[0].axes]
    assert titles == ["training loss", "top-1: train vs validation", "learning rate",
                      "validation: many / medium / few"]
    assert _legend_labels(drawn[0].axes[1]) == ["train top-1", "validation top-1"]


def test_comparison_overlays_every_runs_curves(drawn):
    from longtail.report import figures

    runs = [(f"run{k}", [{"epoch": e, "train_loss": 1.0 / (e + k), "train_top1": 10.0 * e, "val_top1": 9.0 * e}
                         for e in (1, 2)]) for k in range(3)] + [("posthoc", [])]
    figures.training_curves_overlay(runs=runs)
    loss_ax, top_ax = drawn[0].axes
    assert loss_ax.get_title() and top_ax.get_title()
    assert _legend_labels(loss_ax) == ["run0", "run1", "run2", "posthoc (no epochs)"]  # one entry per run
    assert _legend_labels(top_ax)[:4] == _legend_labels(loss_ax)
    assert sum(len(line.get_xdata()) > 0 for line in loss_ax.get_lines()) == 3


def test_every_point_of_the_per_class_plot_is_labelled(drawn):
    from matplotlib.text import Annotation, Text

    from longtail.report import figures

    counts = [50, 50, 50, 20, 20, 10, 10, 10]  # ties at equal count: labels must not hide each other
    per_class = [90.0, 88.0, 90.0, 60.0, None, 20.0, 21.0, 19.0]
    names = [f"c{i}" for i in range(8)]
    figures.accuracy_vs_frequency(series=[("last", per_class), ("best", per_class)], train_counts=counts,
                                  class_names=names)
    ax = drawn[0].axes[0]
    labels = sorted(c.get_text() for c in ax.get_children() if isinstance(c, Annotation))
    assert labels == sorted(n for n, v in zip(names, per_class) if v is not None)  # the class without test images: none
    assert _legend_labels(ax) == ["last", "best"]
    renderer = drawn[0].canvas.get_renderer()
    boxes = [Text.get_window_extent(c, renderer) for c in ax.get_children() if isinstance(c, Annotation)]
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping


def test_group_bars_legend_names_every_run(drawn):
    from longtail.report import figures

    rows = [("a", {"top1": 50.0, "many": 60.0, "medium": 40.0, "few": 10.0}),
            ("b", {"top1": None, "many": None, "medium": None, "few": None}),  # nothing drawn, still named
            ("c", {"top1": float("nan"), "many": 70.0, "medium": None, "few": 5.0})]
    figures.group_bars(rows=rows)
    assert _legend_labels(drawn[0].axes[0]) == ["a", "b", "c"]


def test_ratio_line_is_honest_for_profile_none(runs):
    from longtail.report.rundata import load_run_record
    from longtail.report.tables import config_rows

    rec = load_run_record(runs / "ce")
    exp = dict(config_rows(rec))["long tail"]
    assert "profile exp, imbalance ratio 4.0 (measured 3.8)" in exp
    rec.config["data"]["profile"] = "none"  # as a run on the source's own counts records it
    none = dict(config_rows(rec))["long tail"]
    assert "imbalance ratio 4" not in none
    assert "profile none (class counts as in the source), measured ratio 3.8 of the training counts" in none
