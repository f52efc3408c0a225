"""Compare reports: markdown table, JSON, confusion PNGs, accuracy-vs-time plot."""

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from conftest import ArrayFeatures
from featx.classifiers import compare, significance
from featx.reports import (RESULT_COLUMNS, dataset_summary, format_params, plot_confusion,
                           write_compare_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def FakeFeatures(classes=3, n=90, backbone="toy", weights="imagenet", seed=0):
    X, y = make_blobs(n_samples=n, centers=classes, n_features=8, random_state=seed)
    return ArrayFeatures(X.astype(np.float32), y, ["train", "train", "val"] * (n // 3),
                         [f"class{i}" for i in range(classes)], backbone, weights)


@pytest.fixture(scope="module")
def results():
    rows = compare([FakeFeatures()], ["softmax", "knn", "tree"], cv=3)
    significance(rows)
    return rows


def table_rows(markdown):
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(RESULT_COLUMNS) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_report_files_and_numbers(results, tmp_path):
    features = FakeFeatures()
    dataset = dataset_summary(features)
    report = write_compare_report(results, dataset, tmp_path / "report",
                                  notes=["fine-tune time / best linear-probe time: 3.2x"])
    out = tmp_path / "report"
    for name in ("report.md", "report.json", "accuracy_vs_fit_time.png",
                 "confusion_softmax_toy.png", "confusion_knn_toy.png", "confusion_tree_toy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC or name.startswith("report")

    markdown = (out / "report.md").read_text()
    rows = table_rows(markdown)
    ordered = sorted(results, key=lambda r: (-r["accuracy"], r["fit_seconds"]))
    assert [row[1] for row in rows] == [r["clf"] for r in ordered]
    for row, r in zip(rows, ordered):
        assert row[0] == str(1 + sum(o["accuracy"] > r["accuracy"] for o in ordered))
        assert row[2:5] == ["toy", "imagenet", "val"]
        for cell, metric in zip((row[5], row[7], row[8]),
                                ("accuracy", "balanced_accuracy", "macro_f1")):
            low, high = r["intervals"][metric]
            assert cell == f"{r[metric]:.4f} ({low:.3f}-{high:.3f})"
        assert row[6] == "best" if r["vs_best"] is None else row[6].endswith(
            f"(p={r['vs_best']['p_value']:.3g})")
        assert row[9] == "-"  # in-memory features record no extraction cost
        assert row[10] == f"{r['fit_seconds']:.2f}"
        assert row[11] == f"{r['predict_ms_per_image']:.3f}"
        assert row[12] == format_params(r["best_params"])
    assert "## Calibration" in markdown and "## Answering only when confident" in markdown
    for name in ("reliability.png", "coverage.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "**val** split (30 images)" in markdown and "train split (60 images)" in markdown
    assert "imagenet (`imagenet:seed=0`)" in markdown and "RANDOM" not in markdown
    assert f"Per-class metrics of the best model: {ordered[0]['clf']}" in markdown
    train0, val0 = (int(((features.split == s) & (features.labels == 0)).sum())
                    for s in ("train", "val"))
    assert f"| class0 | {train0} | {val0} | {train0 + val0} |" in markdown
    assert "- fine-tune time / best linear-probe time: 3.2x" in markdown

    stored = json.loads((out / "report.json").read_text())
    assert stored == report
    assert stored["best"]["clf"] == ordered[0]["clf"]
    assert stored["splits"] == ["val"] and stored["random_weights"] is False
    for saved, r in zip(stored["results"], ordered):
        assert "estimator" not in saved and "eval_rows" not in saved
        assert saved["intervals"] == r["intervals"] and saved["ece"] == r["ece"]
        assert saved["accuracy"] == r["accuracy"]
        assert saved["confusion_matrix"] == r["confusion_matrix"]
    assert set(stored["files"]["confusion"].values()) == {
        "confusion_softmax_toy.png", "confusion_knn_toy.png", "confusion_tree_toy.png"}


def test_random_weights_and_untuned_rows_are_flagged(tmp_path):
    results = compare([FakeFeatures(weights="random")], ["softmax"], tune=False)
    report = write_compare_report(results, {"root": "/data/toy"}, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("RANDOM") >= 2 and "WARNING" in markdown.splitlines()[2]
    assert table_rows(markdown)[0][12] == "C=1.0 (not tuned)"
    assert "cross-validation" not in markdown
    assert report["random_weights"] is True


def test_extra_rows_and_file_name_collisions(results, tmp_path):
    imagenet = {**results[0], "accuracy": 0.9}
    random = {**results[0], "weights": "random", "accuracy": 0.5}
    finetune = {"clf": "finetune", "backbone": "toy", "weights": "imagenet", "split": "val",
                "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0,
                "fit_seconds": 120.0, "best_params": {"epochs": 5}}
    report = write_compare_report([imagenet, random, finetune], {"root": "/x"}, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert table_rows(markdown)[0][:2] == ["1", "finetune"]
    assert table_rows(markdown)[0][5] == "1.0000"  # no interval without predictions
    assert table_rows(markdown)[0][11] == "-"  # no predict time given
    assert sorted(report["files"]["confusion"].values()) == [
        "confusion_softmax_toy_imagenet.png", "confusion_softmax_toy_random.png"]
    assert "Per-class metrics" not in markdown  # the best row (finetune) has none


def test_many_classes_confusion_plot(tmp_path):
    rng = np.random.default_rng(0)
    n = 100
    matrix = np.diag(rng.integers(5, 20, n)) + (rng.random((n, n)) < 0.02)
    path = plot_confusion(matrix, [f"species_{i:03d}" for i in range(n)], tmp_path / "cm.png",
                          title="100 classes")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_dataset_summary_counts_original_images_only():
    features = FakeFeatures(n=30)
    features.view[:3] = 1  # augmented views do not count
    summary = dataset_summary(features)
    assert summary["split_sizes"] == {"train": 18, "val": 9}
    assert sum(summary["counts"]["train"]) == 18 and "test" not in summary["counts"]
    assert summary["class_names"] == ["class0", "class1", "class2"]


def test_results_need_the_required_keys(tmp_path):
    with pytest.raises(ValueError, match="lacks fit_seconds"):
        write_compare_report([{"clf": "x", "backbone": "b", "weights": "w", "split": "val",
                               "accuracy": 1, "balanced_accuracy": 1, "macro_f1": 1}],
                             {}, tmp_path)


def texts_outside_the_figure(fig) -> list[str]:
    """The texts a draw of ``fig`` puts past its edges (drawn ones only: tick labels beyond
    the view limits exist as artists but are never drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    drawn, draw_text = [], renderer.draw_text

    def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        drawn.append(mtext)
        return draw_text(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = record
    fig.draw(renderer)
    edge = fig.bbox.padded(1)
    return [text.get_text() for text in drawn if text is not None
            and not all(edge.contains(*corner)
                        for corner in text.get_window_extent(renderer).corners())]


def many_results(results, n_classifiers, n_backbones):
    """``results`` repeated under more classifier and backbone names (long ones, random
    weights among them), as a compare of that many would give."""
    out = []
    for b in range(n_backbones):
        for c in range(n_classifiers):
            r = dict(results[c % len(results)], clf=f"{results[c % len(results)]['clf']}{c}",
                     backbone=f"efficientnet_lite{b}+efficientnet_lite2+mobilenet_v2",
                     weights="random" if b == 1 else "imagenet")
            out.append(dict(r, fit_seconds=10.0 ** (c - 2), accuracy=min(1.0, 0.9 + 0.02 * c)))
    return out


def test_the_overflow_check_sees_a_label_past_the_edge():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), layout="constrained")
    fig.subplots().plot([0, 1], [0, 1])
    fig.text(0.9, 0.5, "a label that runs past the right edge")
    assert texts_outside_the_figure(fig) == ["a label that runs past the right edge"]


@pytest.mark.parametrize("n_classifiers,n_backbones", [(1, 1), (5, 1), (5, 4), (12, 8)])
def test_plot_labels_stay_inside_the_figure(results, n_classifiers, n_backbones):
    from featx.reports._figures import (_confusion_title, accuracy_vs_fit_time_figure,
                                        confusion_figure, coverage_figure, history_figure,
                                        reliability_figure)

    rows = many_results(results, n_classifiers, n_backbones)
    figures = {"accuracy_vs_fit_time": accuracy_vs_fit_time_figure(rows),
               "reliability": reliability_figure(rows), "coverage": coverage_figure(rows),
               "confusion": confusion_figure(np.eye(3, dtype=int) * 5, ["a", "b", "c"],
                                             _confusion_title(rows[-1])),
               "history": history_figure({"loss": [1.0, 0.5], "val_loss": [1.1, 0.6]},
                                         stage1_epochs=1, best_epoch=2, title=rows[-1]["clf"])}
    outside = {name: texts_outside_the_figure(fig) for name, fig in figures.items()}
    assert outside == dict.fromkeys(figures, [])
