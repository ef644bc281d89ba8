"""Tests of ensemble_fit.py and ``ensemble_csv.py --fit_weights``: the weight fit, the diagnostics, every refusal."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, assert_refused, call_main, data_args
from conftest import run_cli as run_script
from PIL import Image

import ensemble_csv
import ensemble_fit
import predictions
from predictions import read_probs, read_submission

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "ensemble_csv.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def run_main(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """``ensemble_csv.main(args)`` in this process."""
    return call_main(ensemble_csv.main, capsys, *args)


# ----------------------------------------------------------------------------------------------------------------
# OOF-weighted soft voting (--fit_weights): hand-made arrays with known optimal weights
# ----------------------------------------------------------------------------------------------------------------


def _two_class(p_true: list[float], targets: list[int]) -> np.ndarray:
    """[N, 2] probabilities giving each row's true class the probability ``p_true``."""
    probs = np.empty((len(targets), 2))
    for n, (p, t) in enumerate(zip(p_true, targets)):
        probs[n, t], probs[n, 1 - t] = p, 1 - p
    return probs


def test_fit_log_loss_weights_known_optimum():
    # A is certain and right on 3 rows, certain and wrong on 1; B the reverse. The log loss of the mixture is
    # -(3 log w + log(1 - w)) / 4 (up to the floor), minimal at w = 3/4.
    targets = np.array([0, 1, 0, 1])
    a = _two_class([1, 1, 1, 0], targets.tolist())
    b = _two_class([0, 0, 0, 1], targets.tolist())
    w, steps = ensemble_fit.fit_log_loss_weights([a, b], targets)
    np.testing.assert_allclose(w, [0.75, 0.25], atol=1e-9)
    assert steps < 100
    assert ensemble_fit.oof_log_loss([a, b], targets, w) == pytest.approx(-(3 * np.log(0.75) + np.log(0.25)) / 4)
    # Interior optimum of a smooth case: 8 rows where A gives the truth 0.6 and B 0.45, 2 rows where A gives 0 and
    # B 0.45. d/dw [-8 log(0.45 + 0.15 w) - 2 log(0.45 (1 - w))] = 0 at w = 0.2.
    targets = np.zeros(10, dtype=np.int64)
    a = _two_class([0.6] * 8 + [0.0] * 2, targets.tolist())
    b = _two_class([0.45] * 10, targets.tolist())
    w, _ = ensemble_fit.fit_log_loss_weights([a, b], targets)
    np.testing.assert_allclose(w, [0.2, 0.8], atol=1e-6)
    # Two copies of one model share its weight equally (the fit is symmetric and starts uniform).
    w, _ = ensemble_fit.fit_log_loss_weights([a, a, b], targets)
    np.testing.assert_allclose(w, [0.1, 0.1, 0.8], atol=1e-6)


def test_fit_log_loss_weights_beats_a_grid_search():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 5, size=200)
    runs = [rng.dirichlet(np.full(5, alpha), size=200) for alpha in (0.3, 1.0, 3.0)]
    for j, run in enumerate(runs):  # make them better than chance, each in its own way
        run[np.arange(200), targets] += 0.3 * (j + 1) * (rng.random(200) < 0.5)
        run /= run.sum(axis=1, keepdims=True)
    w, _ = ensemble_fit.fit_log_loss_weights(runs, targets)
    assert (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-12)
    best_grid = min(
        ensemble_fit.oof_log_loss(runs, targets, [i / 50, j / 50, (50 - i - j) / 50])
        for i in range(51)
        for j in range(51 - i)
    )
    assert ensemble_fit.oof_log_loss(runs, targets, w) <= best_grid + 1e-12
    # Deterministic: the same inputs give the same weights, bit for bit.
    assert np.array_equal(ensemble_fit.fit_log_loss_weights(runs, targets)[0], w)


def test_choose_oof_weights_never_below_the_best_run():
    targets = np.zeros(10, dtype=np.int64)
    # The log-loss optimum (w = 0.2, see above) puts the 8 rows at 0.48 < 0.5: accuracy 0, while A alone scores 0.8.
    # Uniform weights give 0.525 on those rows: 0.8 too, with a lower log loss than A alone, so uniform wins.
    a = _two_class([0.6] * 8 + [0.0] * 2, targets.tolist())
    b = _two_class([0.45] * 10, targets.tolist())
    fit = ensemble_fit.choose_oof_weights([a, b], targets, ["a", "b"])
    by_name = {c["name"]: c for c in fit["candidates"]}
    assert [c["name"] for c in fit["candidates"]] == ["fitted", "uniform", "only a", "only b"]
    np.testing.assert_allclose(by_name["fitted"]["weights"], [0.2, 0.8], atol=1e-6)
    assert by_name["fitted"]["oof_acc"] == 0.0 and by_name["only a"]["oof_acc"] == 0.8
    assert fit["chosen"] == "uniform" and fit["oof_acc"] == 0.8
    assert fit["weights"].tolist() == [0.5, 0.5]
    # With B at 0.35, uniform drops to 0.475 (accuracy 0) and the fit (w = 0.52) to 0.48: A alone is chosen.
    b = _two_class([0.35] * 10, targets.tolist())
    fit = ensemble_fit.choose_oof_weights([a, b], targets, ["a", "b"])
    np.testing.assert_allclose(fit["candidates"][0]["weights"], [0.52, 0.48], atol=1e-6)
    assert fit["chosen"] == "only a" and fit["weights"].tolist() == [1.0, 0.0] and fit["oof_acc"] == 0.8


def test_correctness_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=50)
    preds = rng.integers(0, 3, size=(50, 4))
    corr = ensemble_fit.correctness_correlation(preds, targets)
    expected = np.corrcoef((preds == targets[:, None]).T.astype(float))
    np.testing.assert_allclose(corr, expected, atol=1e-12)
    assert np.array_equal(corr, corr.T) and (np.diag(corr) == 1).all()
    # A run right everywhere has no variance: its correlations are undefined (NaN), its diagonal still 1.
    preds[:, 1] = targets
    corr = ensemble_fit.correctness_correlation(preds, targets)
    assert np.isnan(corr[1, [0, 2, 3]]).all() and np.isnan(corr[[0, 2, 3], 1]).all() and corr[1, 1] == 1
    agree = ensemble_fit.prediction_agreement(preds)
    assert agree[0, 2] == pytest.approx((preds[:, 0] == preds[:, 2]).mean()) and (np.diag(agree) == 1).all()


def _fake_run(folder: Path, oof_probs: np.ndarray, targets, test_probs: np.ndarray) -> Path:
    """A run folder holding only what --fit_weights reads: oof.csv, oof_probs.npy, test_probs.csv."""
    folder.mkdir(parents=True)
    n = len(targets)
    pd.DataFrame(
        {"image_path": [f"c/{i}.png" for i in range(n)], "target": targets, "fold": [i % 2 for i in range(n)],
         "pred": oof_probs.argmax(1)}
    ).to_csv(folder / "oof.csv", index=False)
    np.save(folder / "oof_probs.npy", oof_probs.astype(np.float32))
    predictions.write_probs(test_probs, [f"t/{i}.png" for i in range(len(test_probs))], folder / "test_probs.csv")
    return folder


def test_cli_fit_weights_hand_made_runs(tmp_path):
    targets = [0, 1, 0, 1]
    a = _fake_run(tmp_path / "a", _two_class([1, 1, 1, 0], targets), targets, np.array([[0.9, 0.1], [0.2, 0.8]]))
    b = _fake_run(tmp_path / "b", _two_class([0, 0, 0, 1], targets), targets, np.array([[0.1, 0.9], [0.6, 0.4]]))
    out = tmp_path / "out" / "ens.csv"
    r = run_cli(a, b / "test_probs.csv", "--fit_weights", "-o", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "ens_fit" / "weights.json").read_text())
    assert report["chosen"] == "fitted"
    np.testing.assert_allclose(report["weights"], [0.75, 0.25], atol=1e-9)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["run", "OOF", "acc", "OOF", "log", "loss", "weight"]
    assert lines[1].split()[:2] == ["a", "0.7500"] and lines[1].split()[3] == "0.750000"
    assert lines[2].split()[:2] == ["b", "0.2500"] and lines[2].split()[3] == "0.250000"
    assert lines[3].startswith("ensemble OOF acc 0.7500,") and "best single run a 0.7500" in lines[3]
    # Test rows: 0.75 * A + 0.25 * B.
    expected = 0.75 * np.array([[0.9, 0.1], [0.2, 0.8]]) + 0.25 * np.array([[0.1, 0.9], [0.6, 0.4]])
    _, probs = read_probs(tmp_path / "out" / "ens_fit" / "probs.csv")
    np.testing.assert_allclose(probs, expected, atol=1e-9)
    assert read_submission(out)["target"].tolist() == [0, 1]
    corr = pd.read_csv(tmp_path / "out" / "ens_fit" / "corr.csv", index_col="run")
    assert corr.loc["a", "b"] == pytest.approx(-1.0) and corr.loc["a", "a"] == 1.0  # A right exactly where B is wrong
    # The side files sit in ens_fit/, so a glob over the folder's submissions (the README's next step) votes.
    shutil.copyfile(out, tmp_path / "out" / "other.csv")
    glob = sorted(str(p) for p in (tmp_path / "out").glob("*.csv"))
    assert [Path(p).name for p in glob] == ["ens.csv", "other.csv"]
    r = run_cli(*glob, "-o", tmp_path / "vote.csv")
    assert r.returncode == 0, r.stderr
    assert read_submission(tmp_path / "vote.csv")["target"].tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# --fit_weights on real runs of main.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oof_runs(tiny_data, tmp_path_factory) -> list[Path]:
    """Three 2-fold runs on the tiny set: two architectures, three seeds (so three different fold splits)."""
    root = tmp_path_factory.mktemp("oof_runs")
    runs = []
    for name, extra in (
        ("resnet_s42", ["--seed", "42"]),
        ("effnet_s1", ["--seed", "1", "--model", "test_efficientnet"]),
        ("resnet_s7", ["--seed", "7", "--learning_rate", "3e-3"]),
    ):
        run_script("main.py", *FAST, *data_args(tiny_data), "--kfold", "2", "--max_epochs", "2", *extra,
                   "--save_dir", root / name, "--output_dir", root / "outputs")
        runs.append(root / name)
    return runs


def _oof(run: Path) -> tuple[pd.DataFrame, np.ndarray]:
    return pd.read_csv(run / "oof.csv"), np.load(run / "oof_probs.npy").astype(np.float64)


def test_cli_fit_weights_real_runs(oof_runs, tmp_path, tiny_data):
    out = tmp_path / "ens.csv"
    r = run_cli(*oof_runs[:2], oof_runs[2] / "test_probs.csv", "--fit_weights", "-o", out)
    assert r.returncode == 0, r.stderr
    names = [run.name for run in oof_runs]
    report = json.loads((tmp_path / "ens_fit" / "weights.json").read_text())
    weights = np.array(report["weights"])
    assert len(weights) == 3 and (weights >= 0).all() and weights.sum() == pytest.approx(1.0, abs=1e-12)
    for png in ("model_correlation.png", "model_accuracy.png"):  # the ensemble's plots, beside its report
        with Image.open(tmp_path / "ens_fit" / png) as im:
            assert im.format == "PNG" and min(im.size) > 200
        assert str(tmp_path / "ens_fit" / png) in r.stdout

    # Per-run OOF accuracy, recomputed from the run folders.
    frames = [_oof(run) for run in oof_runs]
    targets = frames[0][0]["target"].to_numpy()
    assert all(f[0]["image_path"].tolist() == frames[0][0]["image_path"].tolist() for f in frames)
    accs = [float((p.argmax(1) == targets).mean()) for _, p in frames]
    summaries = [json.loads((run / "summary.json").read_text())["oof_acc"] for run in oof_runs]
    np.testing.assert_allclose(accs, summaries, atol=1e-12)
    assert [row["oof_acc"] for row in report["runs"]] == accs
    lines = r.stdout.splitlines()
    for j, name in enumerate(names):
        fields = lines[1 + j].split()
        assert fields[0] == name and fields[1] == f"{accs[j]:.4f}" and fields[3] == f"{weights[j]:.6f}"
        loss = -np.log(np.clip(frames[j][1][np.arange(len(targets)), targets], 1e-15, None)).mean()
        assert fields[2] == f"{loss:.4f}"

    # Ensemble OOF accuracy from the saved weights, never below the best single run.
    mean = sum(w * p for w, (_, p) in zip(weights, frames))
    ens_acc = float((mean.argmax(1) == targets).mean())
    assert report["ensemble_oof_acc"] == pytest.approx(ens_acc, abs=1e-12)
    assert ens_acc >= max(accs)
    assert lines[4].startswith(f"ensemble OOF acc {ens_acc:.4f}, ")
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["weights"] == report["weights"]
    assert chosen["oof_acc"] == max(c["oof_acc"] for c in report["candidates"])
    fitted = report["candidates"][0]
    assert fitted["name"] == "fitted"
    assert all(fitted["oof_log_loss"] <= c["oof_log_loss"] + 1e-12 for c in report["candidates"])

    # Correlation: the CSV equals numpy's Pearson correlation of OOF correctness; symmetric, unit diagonal.
    corr = pd.read_csv(tmp_path / "ens_fit" / "corr.csv", index_col="run")
    assert corr.index.tolist() == names and corr.columns.tolist() == names
    correct = np.stack([(p.argmax(1) == targets).astype(float) for _, p in frames])
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.corrcoef(correct)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(corr.to_numpy(), expected, atol=1e-12, equal_nan=True)
    assert np.allclose(corr.to_numpy(), corr.to_numpy().T, equal_nan=True) and (np.diag(corr) == 1).all()
    assert lines[5] == "OOF correctness correlation (Pearson):" and lines[6].split() == names
    for j, name in enumerate(names):
        cells = lines[7 + j].split()
        assert cells[0] == name and cells[1:] == [f"{v:.3f}" for v in corr.to_numpy()[j]]
    diag = ensemble_fit.ensemble_diagnostics(names, [p for _, p in frames], targets, weights)
    assert diag["oof_acc"] == dict(zip(names, accs)) and diag["ensemble_acc"] == pytest.approx(ens_acc)
    np.testing.assert_allclose(diag["correlation"].to_numpy(), corr.to_numpy(), equal_nan=True)

    # Test side: the weighted mean of the runs' test_probs.csv, and its argmax as the submission.
    test_probs = [read_probs(run / "test_probs.csv")[1] for run in oof_runs]
    expected_probs = sum(w * p for w, p in zip(weights, test_probs))
    keys, probs = read_probs(tmp_path / "ens_fit" / "probs.csv")
    np.testing.assert_allclose(probs, expected_probs, atol=1e-12)
    sub = pd.read_csv(out)
    test_csv = pd.read_csv(tiny_data / "test.csv")
    assert list(sub.columns) == ["ID", "image_path", "target"] and len(sub) == len(test_csv) == 10
    assert sub["image_path"].tolist() == test_csv["image_path"].tolist() and sub["ID"].tolist() == list(range(10))
    assert sub["target"].tolist() == expected_probs.argmax(1).tolist()
    assert r.stdout.strip().splitlines()[-1].startswith("ensemble: 3 files, 10 rows, OOF-weighted soft voting")

    # The same inputs give the same weights.
    again = run_cli(*oof_runs, "--fit_weights", "-o", tmp_path / "again.csv")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again_fit" / "weights.json").read_text())["weights"] == report["weights"]


def _mismatch_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two compatible 48-row, 4-class runs with class names in their summary.json."""
    rng = np.random.default_rng(5)
    targets = (np.arange(48) % 4).tolist()
    test = rng.dirichlet(np.ones(4), size=10)
    runs = []
    for name in ("good", "bad"):
        run = _fake_run(tmp_path / name, rng.dirichlet(np.ones(4), size=48), targets, test)
        (run / "summary.json").write_text(json.dumps({"class_names": ["ant", "bee", "cat", "dog"]}))
        runs.append(run)
    return runs[0], runs[1]


@pytest.mark.parametrize("case", ["reordered", "target", "shorter", "no_oof", "classes", "class_names"])
def test_cli_fit_weights_refuses_mismatched_runs(tmp_path, capsys, case):
    good, bad = _mismatch_pair(tmp_path)
    oof = pd.read_csv(bad / "oof.csv")
    probs = np.load(bad / "oof_probs.npy")
    needle = "OOF row"
    if case == "reordered":
        oof = oof.iloc[[1, 0, *range(2, len(oof))]]
        probs = probs[[1, 0, *range(2, len(probs))]]
    elif case == "target":
        oof.loc[5, "target"] = (oof.loc[5, "target"] + 1) % 4
        needle = "OOF row 5: target"
    elif case == "shorter":
        oof, probs = oof.iloc[:-1], probs[:-1]
        needle = "47 OOF rows"
    elif case == "no_oof":
        (bad / "oof.csv").unlink()
        needle = "no oof.csv"
    elif case == "classes":
        probs = np.concatenate([probs, np.zeros((len(probs), 1), np.float32)], axis=1)
        needle = "5 classes"
    elif case == "class_names":
        summary = json.loads((bad / "summary.json").read_text())
        summary["class_names"] = summary["class_names"][::-1]
        (bad / "summary.json").write_text(json.dumps(summary))
        needle = "class names"
    if case != "no_oof":
        oof.to_csv(bad / "oof.csv", index=False)
        np.save(bad / "oof_probs.npy", probs)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_main(capsys, good, bad, "--fit_weights", "-o", tmp_path / "ens.csv")
    assert_refused(r, needle)
    assert str(bad) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--weights", "1", "2"], "--weights"),
        (["--weights_out", "w.json"], "--weights_out: only with --fit_weights"),
        (["--corr_out", "c.csv"], "--corr_out: only with --fit_weights"),
    ],
)
def test_cli_fit_weights_flag_refusals(tmp_path, capsys, extra, needle):
    targets = [0, 1]
    runs = [_fake_run(tmp_path / k, _two_class([0.7, 0.6], targets), targets, np.full((3, 2), 0.5)) for k in "ab"]
    fit = [] if extra[0] in ("--weights_out", "--corr_out") else ["--fit_weights"]
    if not fit:
        runs = [run / "test_probs.csv" for run in runs]
    r = run_main(capsys, *runs, *fit, *extra, "-o", tmp_path / "ens.csv")
    assert_refused(r, needle)
    assert not (tmp_path / "ens.csv").exists()


def test_cli_fit_weights_refuses_overwriting_a_run_file(tmp_path, capsys):
    targets = [0, 1]
    a, b = (_fake_run(tmp_path / k, _two_class([0.7, 0.6], targets), targets, np.full((3, 2), 0.5)) for k in "ab")
    original = (b / "oof.csv").read_bytes()
    r = run_main(capsys, a, b, "--fit_weights", "-o", tmp_path / "ens.csv", "--corr_out", b / "oof.csv")
    assert_refused(r, "oof.csv")
    assert (b / "oof.csv").read_bytes() == original and not (tmp_path / "ens.csv").exists()


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("99999999999999999999999", "row 1 (c/1.png): target 99999999999999999999999 does not fit a 64-bit integer"),
        ("cat", "row 1 (c/1.png): target 'cat' is not an integer"),
        ("7", "row 1 (c/1.png): target 7 is outside 0..1"),
    ],
)
def test_read_run_oof_refuses_bad_targets_in_one_line(tmp_path, cell, message):
    run = _fake_run(tmp_path / "run", _two_class([0.7, 0.6], [0, 1]), [0, 1], np.full((3, 2), 0.5))
    text = (run / "oof.csv").read_text().splitlines()
    fields = text[2].split(",")
    fields[1] = cell
    text[2] = ",".join(fields)
    (run / "oof.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ensemble_fit.EnsembleError) as info:
        ensemble_fit.read_run_oof(run)
    assert str(info.value) == f"{run / 'oof.csv'}: {message}"


def test_read_run_oof_and_resolve_run(tmp_path):
    run = _fake_run(tmp_path / "run", _two_class([0.7, 0.6], [0, 1]), [0, 1], np.full((3, 2), 0.5))
    assert ensemble_fit.resolve_run(run) == (run, run / "test_probs.csv")
    assert ensemble_fit.resolve_run(run / "test_probs.csv") == (run, run / "test_probs.csv")
    oof = ensemble_fit.read_run_oof(run)
    assert oof.name == "run" and oof.probs_path == run / "test_probs.csv" and oof.targets.tolist() == [0, 1]
    assert oof.probs.dtype == np.float64 and oof.image_paths.tolist() == ["c/0.png", "c/1.png"]
    np.save(run / "oof_probs.npy", np.zeros((2, 2), np.int64))
    with pytest.raises(ensemble_fit.EnsembleError, match="dtype int64 is not floating point"):
        ensemble_fit.read_run_oof(run)


def test_fit_steps_in_process(tmp_path, capsys):
    targets = [0, 1, 0, 1]
    test_a, test_b = np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.1, 0.9], [0.6, 0.4]])
    a = _fake_run(tmp_path / "a", _two_class([1, 1, 1, 0], targets), targets, test_a)
    b = _fake_run(tmp_path / "b", _two_class([0, 0, 0, 1], targets), targets, test_b)
    probs_paths = [a / "test_probs.csv", b / "test_probs.csv"]
    runs = ensemble_fit.load_fit_runs(probs_paths, [test_a, test_b])
    paths = ensemble_fit.FitPaths(*(str(tmp_path / f"out{suffix}") for suffix in (".csv", "_p.csv", ".json", "_c.csv")))
    ens = ensemble_fit.fit_ensemble(runs, [test_a, test_b], paths)
    np.testing.assert_allclose(ens.report["weights"], [0.75, 0.25], atol=1e-9)
    assert ens.result.tolist() == [0, 1] and ens.disagree == 2 and ens.report["best_single_run"] == "a"
    keys, _ = read_probs(probs_paths[0])
    ensemble_fit.write_fit_outputs(ens, keys, paths)
    assert read_submission(paths.output)["image_path"].tolist() == ["t/0.png", "t/1.png"]
    assert json.loads(Path(paths.weights_out).read_text()) == ens.report
    ensemble_fit.print_fit_summary(ens, paths, [])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "OOF", "acc", "OOF", "log", "loss", "weight"] and out[-1].startswith("weights: ")


def test_module_shape():
    """ensemble_fit never imports the command line (no circle), and no function of the three modules is long."""
    for name in ("ensemble_csv", "ensemble_fit", "predictions"):
        tree = ast.parse((REPO / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        if name != "ensemble_csv":
            assert "ensemble_csv" not in imported, name
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 80, (name, node.name)
            if isinstance(node, ast.ImportFrom) and node.module in {"ensemble_csv", "ensemble_fit", "predictions"}:
                assert not any(alias.name.startswith("_") for alias in node.names), (name, node.module)
