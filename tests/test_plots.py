"""plots.py: the PNGs of a real tiny run and of an ensemble, the numbers behind them, many-class layouts, bad runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, data_args, run_cli
from PIL import Image
from sklearn.metrics import confusion_matrix

import plots
import runfiles


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A real 2-fold, 2-epoch run on the tiny set (4 classes x 12 images)."""
    out = tmp_path_factory.mktemp("plots_run")
    run_cli("main.py", *FAST, *data_args(tiny_data), "--kfold", "2", "--max_epochs", "2", "--save_dir", out / "run",
            "--output_dir", out / "outputs")
    return out / "run"


def _check_png(path: Path, min_size=(400, 250), max_size=(3000, 3000)) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert min_size[0] <= w <= max_size[0] and min_size[1] <= h <= max_size[1], (path, im.size)
    # Something was drawn: not a blank page.
    assert (pixels < 128).mean() > 0.002 and len(np.unique(pixels)) > 10, path
    return w, h


def _synthetic_run(folder: Path, classes: int, rows: int = 3000, seed: int = 0) -> Path:
    """A fake run folder with many classes: oof.csv, summary.json and two folds' metrics.csv.

    Class 7 is planted as the most confused class: 40 of its images are predicted as class 8."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, rows)
    preds = np.where(rng.random(rows) < 0.7, targets, rng.integers(0, classes, rows))
    targets[:60], preds[:40], preds[40:60] = 7, 8, 7
    folder.mkdir(parents=True)
    pd.DataFrame({"image_path": [f"img_{i}.png" for i in range(rows)], "target": targets, "fold": np.arange(rows) % 2,
                  "pred": preds}).to_csv(folder / "oof.csv", index=False)
    names = [f"class number {i} with a rather long name" if i % 5 == 0 else f"class {i}" for i in range(classes)]
    summary = {"class_names": names, "oof_acc": float((preds == targets).mean())}
    (folder / "summary.json").write_text(json.dumps(summary))
    for fold in (0, 1):
        (folder / f"fold_{fold}").mkdir()
        pd.DataFrame({"epoch": range(12), "lr": np.geomspace(1e-3, 1e-6, 12), "train_loss": np.linspace(5, 1, 12),
                      "val_loss": np.linspace(5, 2, 12), "val_acc": np.linspace(0, 0.7, 12),
                      "val_f1": np.linspace(0, 0.6, 12)}).to_csv(folder / f"fold_{fold}" / "metrics.csv", index=False)
    return folder


# ----------------------------------------------------------------------------------------------- a real run
def test_run_plots_of_a_real_run(tiny_run):
    paths = plots.write_run_plots(tiny_run)
    assert paths == [tiny_run / "plots" / name for name in ("curves.png", "confusion.png", "per_class_accuracy.png")]
    for path in paths:
        _check_png(path)
    # Atomic writes leave no temporary file behind.
    assert sorted(p.name for p in (tiny_run / "plots").iterdir()) == sorted(p.name for p in paths)


def test_plot_numbers_match_oof(tiny_run):
    oof = pd.read_csv(tiny_run / "oof.csv")
    oof_checked, names = plots.read_oof(tiny_run)
    assert names == json.loads((tiny_run / "summary.json").read_text())["class_names"] and len(names) == 4
    t, p = oof["target"].to_numpy(), oof["pred"].to_numpy()

    cm = plots.confusion_counts(t, p, 4)
    assert (cm == confusion_matrix(t, p, labels=range(4))).all() and cm.sum() == 48

    table = plots.per_class_table(t, p, names)
    by_class = oof.assign(ok=oof["target"] == oof["pred"]).groupby("target")["ok"].agg(["size", "sum"])
    for row in table.itertuples(index=False):
        assert row.count == by_class.loc[row.target, "size"] == 12
        assert row.correct == by_class.loc[row.target, "sum"]
        assert row.class_name == names[row.target]
    assert table["accuracy"].is_monotonic_increasing

    pairs = plots.confused_pairs(cm)
    errors = oof[oof["target"] != oof["pred"]]
    assert pairs["count"].sum() == len(errors)
    expected = errors.groupby(["target", "pred"]).size()
    assert {(r.true, r.pred): r.count for r in pairs.itertuples()} == expected.to_dict()
    assert pairs["count"].is_monotonic_decreasing
    assert np.allclose(pairs["share"], pairs["count"] / 12)


def test_curves_read_every_fold(tiny_run):
    metrics = plots.read_metrics(tiny_run)
    assert list(metrics) == [0, 1]
    assert all(m["epoch"].tolist() == [0, 1] for m in metrics.values())


# ----------------------------------------------------------------------------------------------- many classes
def test_many_classes_stay_readable(tmp_path):
    run = _synthetic_run(tmp_path / "run300", classes=300)
    oof, names = plots.read_oof(run)
    # The figures keep a fixed size however many classes there are (a 300x300 matrix would be unreadable).
    _check_png(plots.plot_confusion(oof["target"], oof["pred"], names, tmp_path / "confusion.png"),
               min_size=(1200, 600), max_size=(2400, 1400))
    _check_png(plots.plot_per_class_accuracy(oof["target"], oof["pred"], names, tmp_path / "per_class.png"),
               min_size=(1000, 600), max_size=(2400, 1400))

    cm = plots.confusion_counts(oof["target"], oof["pred"], len(names))
    chosen = plots.most_confused_classes(cm, plots.TOP_CONFUSED_CLASSES)
    assert len(chosen) == plots.TOP_CONFUSED_CLASSES == len(set(chosen))
    assert chosen[:2] == [7, 8]  # the planted confusion comes first
    top = plots.confused_pairs(cm).iloc[0]
    assert (top["true"], top["pred"], top["count"]) == (7, 8, 40)

    # Fewer classes than the full-matrix limit: the whole matrix, one row per class, grows with the classes.
    oof, names = plots.read_oof(_synthetic_run(tmp_path / "run25", classes=25, rows=500))
    _, height = _check_png(plots.plot_confusion(oof["target"], oof["pred"], names, tmp_path / "confusion25.png"))
    assert height > 900


def test_short_name_keeps_names_distinct():
    a, b = "person sitting on a chair in the garden", "person sitting on a chair in the kitchen"
    sa, sb = plots.short_name(a), plots.short_name(b)
    assert len(sa) == len(sb) == plots.NAME_CHARS and sa != sb and "\u2026" in sa
    assert sa.startswith("person sitting") and sa.endswith("garden") and sb.endswith("kitchen")
    assert plots.short_name("cloud") == "cloud"


# ----------------------------------------------------------------------------------------------- ensemble
def test_ensemble_plots(tiny_run, tmp_path):
    oof = pd.read_csv(tiny_run / "oof.csv")
    targets = oof["target"].to_numpy()
    probs = np.load(tiny_run / "oof_probs.npy")
    sharper = probs**3 / (probs**3).sum(1, keepdims=True)  # same predictions, other confidences
    outputs = [probs, sharper]
    corr, what = plots.model_correlation(outputs, targets)
    rows = np.arange(len(targets))
    assert what == "probability of the true class"
    assert corr[0, 1] == pytest.approx(np.corrcoef(probs[rows, targets], sharper[rows, targets])[0, 1])

    mean = (probs + sharper) / 2
    paths = plots.write_ensemble_plots(["run_a", "run_b"], outputs, targets, tmp_path / "ens", ensemble=mean)
    assert paths == [tmp_path / "ens" / "model_correlation.png", tmp_path / "ens" / "model_accuracy.png"]
    for path in paths:
        _check_png(path, min_size=(300, 200))

    # Predictions instead of probabilities: correlation of correctness; a model right everywhere has none (n/a).
    labels = [oof["pred"].to_numpy(), targets, np.where(rows % 2 == 0, targets, (targets + 1) % 4)]
    corr, what = plots.model_correlation(labels, targets)
    right = [(x == targets).astype(float) for x in labels]
    assert what.startswith("correctness")
    assert corr[0, 2] == pytest.approx(np.corrcoef(right[0], right[2])[0, 1])
    assert np.isnan(corr[0, 1]) and np.isnan(corr[1, 2]) and corr[1, 1] == 1.0
    plots.write_ensemble_plots(["a", "oracle", "half"], labels, targets, tmp_path / "ens2")
    _check_png(tmp_path / "ens2" / "model_correlation.png", min_size=(300, 200))


def test_ensemble_refuses_mismatched_inputs(tiny_run, tmp_path):
    targets = pd.read_csv(tiny_run / "oof.csv")["target"].to_numpy()
    probs = np.load(tiny_run / "oof_probs.npy")
    with pytest.raises(ValueError, match="2 name"):
        plots.write_ensemble_plots(["a", "b"], [probs], targets, tmp_path)
    with pytest.raises(ValueError, match=r"short: expected 48 OOF rows"):
        plots.write_ensemble_plots(["a", "short"], [probs, probs[:10]], targets, tmp_path)
    with pytest.raises(ValueError, match=r"few: 3 class probabilities"):
        plots.write_ensemble_plots(["few"], [probs[:, :3]], targets, tmp_path)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- bad runs
def test_bad_run_folders(tiny_run, tmp_path):
    with pytest.raises(runfiles.RunFileError, match="run folder not found"):
        plots.write_run_plots(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(runfiles.RunFileError, match=r"empty/oof\.csv: file not found"):
        plots.write_run_plots(tmp_path / "empty")

    bad = tmp_path / "bad"
    bad.mkdir()
    oof = pd.read_csv(tiny_run / "oof.csv")
    oof.astype({"pred": str}).assign(pred=lambda d: d["pred"].where(d.index != 5, "x")).to_csv(bad / "oof.csv",
                                                                                             index=False)
    with pytest.raises(runfiles.RunFileError, match=r"oof\.csv: line 7: pred 'x' is not a class index"):
        plots.write_run_plots(bad)
    oof.assign(target=lambda d: d["target"].where(d.index != 2, 9)).to_csv(bad / "oof.csv", index=False)
    (bad / "summary.json").write_text((tiny_run / "summary.json").read_text())
    with pytest.raises(runfiles.RunFileError, match=r"line 4: class index 9 out of range 0\.\.3"):
        plots.write_run_plots(bad)
    assert not (bad / "plots").exists()
