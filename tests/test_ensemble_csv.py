"""Tests of ensemble_csv.py: exact hard and soft voting, the tie rule, and every refusal (exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import FAST, data_args  # noqa: E402
from conftest import run_cli as run_script  # noqa: E402

import ensemble_csv  # noqa: E402
from ensemble_csv import EnsembleError, hard_vote, read_probs, read_submission, soft_vote  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tuberlin40"
SENTINEL = b"sentinel output, must survive a refused run\n"

# Three hand-made submissions of 6 rows (one column per file A, B, C).
#   row 0: unanimous            1 1 1 -> 1
#   row 1: 2-vs-1 majority      0 2 2 -> 2
#   row 2: three-way tie        0 1 2 -> 0 (A is first)
#   row 3: three-way tie        2 1 0 -> 2 (A is first)
#   row 4: 2-vs-1 majority      3 3 0 -> 3
#   row 5: 2-vs-1, A outvoted   0 1 1 -> 1 (but 0 once A weighs 2 or more)
PREDS = np.array(
    [
        [1, 1, 1],
        [0, 2, 2],
        [0, 1, 2],
        [2, 1, 0],
        [3, 3, 0],
        [0, 1, 1],
    ]
)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "ensemble_csv.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def write_sub(path: Path, targets, ids=None, paths=None) -> Path:
    n = len(targets)
    ids = list(range(n)) if ids is None else ids
    paths = [f"{i}.JPEG" for i in range(n)] if paths is None else paths
    pd.DataFrame({"ID": ids, "image_path": paths, "target": list(targets)}).to_csv(path, index=False)
    return path


def write_probs(path: Path, probs: np.ndarray) -> Path:
    n, c = probs.shape
    df = pd.DataFrame({"ID": range(n), "image_path": [f"{i}.JPEG" for i in range(n)]})
    for k in range(c):
        df[f"prob_{k}"] = probs[:, k]
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def subs(tmp_path: Path) -> list[Path]:
    return [write_sub(tmp_path / f"{name}.csv", PREDS[:, j]) for j, name in enumerate("abc")]


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic, called directly
# ----------------------------------------------------------------------------------------------------------------


def test_hard_vote_exact():
    assert hard_vote(PREDS).tolist() == [1, 2, 0, 2, 3, 1]


def test_hard_vote_tie_follows_argument_order():
    # Swapping A and B: the three-way ties of rows 2 and 3 now go to B's class.
    assert hard_vote(PREDS[:, [1, 0, 2]]).tolist() == [1, 2, 1, 1, 3, 1]
    assert hard_vote(PREDS[:, [2, 1, 0]]).tolist() == [1, 2, 2, 0, 3, 1]


def test_hard_vote_weights():
    # A weighs 3: it beats B+C everywhere it disagrees with both.
    assert hard_vote(PREDS, [3, 1, 1]).tolist() == [1, 0, 0, 2, 3, 0]
    # A weighs 2: row 1 and row 5 become 2-vs-2 ties, won by A (earliest file).
    assert hard_vote(PREDS, [2, 1, 1]).tolist() == [1, 0, 0, 2, 3, 0]
    # C weighs 2: C wins its three-way ties (rows 2, 3) and row 4 ties 2-vs-2, won by A's class 3.
    assert hard_vote(PREDS, [1, 1, 2]).tolist() == [1, 2, 2, 0, 3, 1]
    # Fractional weights that sum exactly in decimal but not in binary still tie.
    assert hard_vote(np.array([[0, 1, 1]]), [0.3, 0.1, 0.2]).tolist() == [0]


def test_hard_vote_zero_weight_file_takes_no_part():
    # A has weight 0: the B-vs-C tie goes to B even though A (first) agrees with C.
    assert hard_vote(np.array([[2, 1, 2]]), [0, 1, 1]).tolist() == [1]
    assert hard_vote(np.array([[2, 1, 2]]), [1, 1, 1]).tolist() == [2]


def test_hard_vote_rejects_bad_weights():
    for weights in ([1, 1], [1, -1, 1], [0, 0, 0], [1, float("nan"), 1]):
        with pytest.raises(ValueError):
            hard_vote(PREDS, weights)


def test_soft_vote_exact():
    p1 = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    p2 = np.array([[0.1, 0.8, 0.1], [0.5, 0.45, 0.05]])
    mean = soft_vote([p1, p2])
    np.testing.assert_allclose(mean, [[0.35, 0.55, 0.10], [0.35, 0.325, 0.325]])
    assert mean.argmax(axis=1).tolist() == [1, 0]
    weighted = soft_vote([p1, p2], [3, 1])
    np.testing.assert_allclose(weighted, [[0.475, 0.425, 0.1], [0.275, 0.2625, 0.4625]])
    assert weighted.argmax(axis=1).tolist() == [0, 2]
    with pytest.raises(ValueError):
        soft_vote([p1, p2[:, :2]])


# ----------------------------------------------------------------------------------------------------------------
# Command line, end to end
# ----------------------------------------------------------------------------------------------------------------


def test_cli_hard_vote(subs, tmp_path):
    out = tmp_path / "out.csv"
    r = run_cli(*subs, "-o", out)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        assert f.readline().strip() == "ID,image_path,target"
    df = pd.read_csv(out)
    assert list(df.columns) == ["ID", "image_path", "target"]
    assert df["ID"].tolist() == list(range(6))
    assert df["image_path"].tolist() == [f"{i}.JPEG" for i in range(6)]
    assert df["target"].tolist() == [1, 2, 0, 2, 3, 1]
    summary = r.stdout.strip().splitlines()
    assert len(summary) == 1
    line = summary[0]
    assert "3 files" in line and "6 rows" in line and "hard voting" in line and str(out) in line
    assert "disagreed on 5 rows" in line
    assert "agrees with the ensemble on" in r.stderr  # per-file agreement is logged
    assert "a.csv (weight 1): agrees with the ensemble on 4/6 rows" in r.stderr


def test_cli_argument_order_and_weights(subs, tmp_path):
    a, b, c = subs
    out = tmp_path / "out.csv"
    assert run_cli(b, a, c, "-o", out).returncode == 0
    assert pd.read_csv(out)["target"].tolist() == [1, 2, 1, 1, 3, 1]
    assert run_cli(a, b, c, "-o", out, "--weights", "3", "1", "1").returncode == 0
    assert pd.read_csv(out)["target"].tolist() == [1, 0, 0, 2, 3, 0]
    assert run_cli(a, b, c, "-o", out, "--weights", "0.5", "1", "1").returncode == 0
    assert pd.read_csv(out)["target"].tolist() == [1, 2, 1, 1, 3, 1]


def test_cli_keeps_input_row_order(tmp_path):
    # Rows in a shuffled order: the output follows the inputs, not sorted IDs.
    ids = [3, 0, 2, 1]
    paths = [f"{i}.JPEG" for i in ids]
    files = [write_sub(tmp_path / f"{k}.csv", t, ids, paths) for k, t in enumerate([[5, 6, 7, 8], [5, 0, 7, 0]])]
    out = tmp_path / "out.csv"
    assert run_cli(*files, "-o", out).returncode == 0
    df = pd.read_csv(out)
    assert df["ID"].tolist() == ids and df["image_path"].tolist() == paths
    assert df["target"].tolist() == [5, 6, 7, 8]  # two-way ties go to the first file


def test_cli_default_output_name(subs, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "ensemble_csv.py"), *map(str, subs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(tmp_path / "ensemble.csv")["target"].tolist() == [1, 2, 0, 2, 3, 1]


def test_cli_soft_vote(tmp_path):
    p1 = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    p2 = np.array([[0.1, 0.8, 0.1], [0.5, 0.45, 0.05], [0.0, 0.5, 0.5]])
    f1, f2 = write_probs(tmp_path / "m1_probs.csv", p1), write_probs(tmp_path / "m2_probs.csv", p2)
    out, probs_out = tmp_path / "out.csv", tmp_path / "mean_probs.csv"
    r = run_cli(f1, f2, "-o", out, "--weights", "3", "1", "--probs_out", probs_out)
    assert r.returncode == 0, r.stderr
    assert "soft voting" in r.stdout and "2 files" in r.stdout and "3 rows" in r.stdout
    assert "disagreed on 3 rows" in r.stdout  # per-file argmax: [0, 2, 2] vs [1, 0, 1]
    expected = (3 * p1 + p2) / 4
    keys, mean = read_probs(probs_out)
    assert list(pd.read_csv(probs_out).columns) == ["ID", "image_path", "prob_0", "prob_1", "prob_2"]
    assert keys["ID"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-12)
    sub = read_submission(out)
    assert list(pd.read_csv(out).columns) == ["ID", "image_path", "target"]
    assert sub["target"].tolist() == [0, 2, 2] == expected.argmax(axis=1).tolist()
    # Unweighted: row 0 goes to class 1.
    assert run_cli(f1, f2, "-o", out).returncode == 0
    assert pd.read_csv(out)["target"].tolist() == [1, 0, 2]


# ----------------------------------------------------------------------------------------------------------------
# Refusals: exit 2, one stderr line naming the file, nothing written
# ----------------------------------------------------------------------------------------------------------------


def _bad_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "ID,image_path,target\n0,0.JPEG,1\n1,1.JPEG,2\n2,2.JPEG,0\n3,3.JPEG,1\n"


def _case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Arguments (without -o) for one refused run, and the text its error must contain."""
    a = _bad_file(tmp_path, "a.csv", GOOD)
    b = _bad_file(tmp_path, "b.csv", GOOD)
    p1 = write_probs(tmp_path / "p1.csv", np.full((4, 3), 1 / 3))
    if case == "one_input":
        return [a], "a.csv"
    if case == "missing":
        return [a, tmp_path / "nothere.csv"], "nothere.csv"
    if case == "empty":
        return [a, _bad_file(tmp_path, "empty.csv", "")], "empty.csv"
    if case == "header_only":
        return [a, _bad_file(tmp_path, "header.csv", "ID,image_path,target\n")], "header.csv"
    if case == "unreadable":
        (tmp_path / "adir.csv").mkdir()
        return [a, tmp_path / "adir.csv"], "adir.csv"
    if case == "binary":
        path = tmp_path / "binary.csv"
        path.write_bytes(b"\xff\xfe\x00\x81garbage\n")
        return [a, path], "binary.csv"
    if case == "wrong_columns":
        return [a, _bad_file(tmp_path, "cols.csv", GOOD.replace("target", "label"))], "cols.csv"
    if case == "missing_column":
        return [a, _bad_file(tmp_path, "nopath.csv", "ID,target\n0,1\n1,2\n2,0\n3,1\n")], "nopath.csv"
    if case == "ragged":
        return [a, _bad_file(tmp_path, "ragged.csv", GOOD.replace("1.JPEG,2", "1.JPEG,2,9"))], "ragged.csv"
    if case == "nan_target":
        return [a, _bad_file(tmp_path, "nan.csv", GOOD.replace("2.JPEG,0", "2.JPEG,"))], "nan.csv"
    if case == "nan_text_target":
        return [a, _bad_file(tmp_path, "nantext.csv", GOOD.replace("2.JPEG,0", "2.JPEG,nan"))], "nantext.csv"
    if case == "float_target":
        return [a, _bad_file(tmp_path, "float.csv", GOOD.replace("2.JPEG,0", "2.JPEG,0.5"))], "float.csv"
    if case == "word_target":
        return [a, _bad_file(tmp_path, "word.csv", GOOD.replace("2.JPEG,0", "2.JPEG,cat"))], "word.csv"
    if case == "negative_target":
        return [_bad_file(tmp_path, "neg.csv", GOOD.replace("2.JPEG,0", "2.JPEG,-1")), b], "neg.csv"
    if case == "ids_differ":
        return [a, _bad_file(tmp_path, "ids.csv", GOOD.replace("2,2.JPEG", "7,2.JPEG"))], "ids.csv: row 2"
    if case == "paths_differ":
        return [a, _bad_file(tmp_path, "paths.csv", GOOD.replace("3,3.JPEG", "3,x.JPEG"))], "paths.csv: row 3"
    if case == "shorter":
        return [a, _bad_file(tmp_path, "short.csv", GOOD.rsplit("\n", 2)[0] + "\n")], "short.csv"
    if case == "longer":
        return [a, b, _bad_file(tmp_path, "long.csv", GOOD + "4,4.JPEG,0\n")], "long.csv"
    if case == "mixed_kinds":
        return [a, p1], "p1.csv"
    if case == "class_counts":
        return [p1, write_probs(tmp_path / "p4.csv", np.full((4, 4), 0.25))], "p4.csv"
    if case == "nan_prob":
        return [p1, _bad_file(tmp_path, "pnan.csv", p1.read_text().replace("\n2,2.JPEG,", "\n2,2.JPEG,nan", 1))], (
            "pnan.csv"
        )
    if case == "weights_count":
        return [a, b, "--weights", "1", "2", "3"], "--weights"
    if case == "weights_negative":
        return [a, b, "--weights", "1", "-1"], "b.csv"
    if case == "weights_zero":
        return [a, b, "--weights", "0", "0"], "--weights"
    if case == "probs_out_hard":
        return [a, b, "--probs_out", tmp_path / "probs_out.csv"], "--probs_out"
    raise AssertionError(case)


REFUSALS = [
    "one_input",
    "missing",
    "empty",
    "header_only",
    "unreadable",
    "binary",
    "wrong_columns",
    "missing_column",
    "ragged",
    "nan_target",
    "nan_text_target",
    "float_target",
    "word_target",
    "negative_target",
    "ids_differ",
    "paths_differ",
    "shorter",
    "longer",
    "mixed_kinds",
    "class_counts",
    "nan_prob",
    "weights_count",
    "weights_negative",
    "weights_zero",
    "probs_out_hard",
]


def _assert_refused(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "error" in lines[0] and needle in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal(tmp_path, case):
    args, needle = _case(tmp_path, case)
    out = tmp_path / "out.csv"
    out.write_bytes(SENTINEL)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    r = run_cli(*args, "-o", out)
    _assert_refused(r, needle)
    assert out.read_bytes() == SENTINEL
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after == before  # no new file (no probs_out, no temporary left behind), nothing touched


@pytest.mark.parametrize("option", ["-o", "--probs_out"])
def test_refusal_output_is_an_input(tmp_path, option):
    p1 = write_probs(tmp_path / "p1.csv", np.full((4, 3), 1 / 3))
    p2 = write_probs(tmp_path / "p2.csv", np.full((4, 3), 1 / 3))
    original = p2.read_bytes()
    extra = ["-o", tmp_path / "out.csv"] if option == "--probs_out" else []
    r = run_cli(p1, p2, option, p2, *extra)
    _assert_refused(r, "p2.csv")
    assert p2.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.csv", "p2.csv"]


def test_refusal_output_is_an_input_via_other_spelling(subs, tmp_path):
    a = subs[0]
    original = a.read_bytes()
    r = run_cli(*subs, "-o", tmp_path / "sub" / ".." / "a.csv")
    _assert_refused(r, "a.csv")
    assert a.read_bytes() == original


def test_read_functions_raise_ensemble_error(tmp_path):
    bad = _bad_file(tmp_path, "bad.csv", GOOD.replace("2.JPEG,0", "2.JPEG,1.5"))
    with pytest.raises(EnsembleError, match=r"bad\.csv: row 2 \(ID 2\)"):
        read_submission(bad)
    assert issubclass(EnsembleError, ValueError)
    with pytest.raises(EnsembleError, match="not a probability file"):
        read_probs(_bad_file(tmp_path, "sub.csv", GOOD))
    sub = read_submission(_bad_file(tmp_path, "good.csv", GOOD))
    assert list(sub.columns) == ["ID", "image_path", "target"]
    assert sub["target"].tolist() == [1, 2, 0, 1]


def test_main_in_process_refusal_exits_2(tmp_path, capsys):
    a = _bad_file(tmp_path, "a.csv", GOOD)
    with pytest.raises(SystemExit) as e:
        ensemble_csv.main([str(a), str(tmp_path / "gone.csv"), "-o", str(tmp_path / "out.csv")])
    assert e.value.code == 2
    assert "gone.csv: file not found" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# Real test IDs: random submissions against a plain per-row reference
# ----------------------------------------------------------------------------------------------------------------


def reference_vote(preds: np.ndarray, weights) -> list[int]:
    result = []
    for row in preds:
        totals: dict[int, float] = {}
        for cls, w in zip(row, weights):
            if w > 0:
                totals[int(cls)] = totals.get(int(cls), 0) + w
        best = max(totals.values())
        for cls, w in zip(row, weights):
            if w > 0 and totals[int(cls)] == best:
                result.append(int(cls))
                break
    return result


def test_random_submissions_on_real_ids(tmp_path):
    sample = SHARED / "sample_submission.csv"
    if not sample.is_file():
        pytest.skip(f"{sample} not present")
    base = pd.read_csv(sample)
    assert list(base.columns) == ["ID", "image_path", "target"] and len(base) == 400
    rng = np.random.default_rng(0)
    # Few classes so that ties are frequent.
    preds = rng.integers(0, 4, size=(len(base), 3))
    files = []
    for j in range(3):
        df = base.copy()
        df["target"] = preds[:, j]
        files.append(tmp_path / f"model{j}.csv")
        df.to_csv(files[-1], index=False)

    for weights in ([1, 1, 1], [2, 1, 1], [1, 2, 3], [0, 1, 1], [1, 1, 2]):
        assert hard_vote(preds, weights).tolist() == reference_vote(preds, weights)
    for _ in range(20):
        m = int(rng.integers(2, 7))
        p = rng.integers(0, 5, size=(200, m))
        w = rng.integers(0, 3, size=m).tolist()
        if sum(w) == 0:
            w[0] = 1
        assert hard_vote(p, w).tolist() == reference_vote(p, w)

    out = tmp_path / "ensemble.csv"
    r = run_cli(*files, "-o", out, "--weights", "1", "2", "3")
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(out)
    assert list(got.columns) == ["ID", "image_path", "target"]
    assert got["ID"].tolist() == base["ID"].tolist()
    assert got["image_path"].tolist() == base["image_path"].tolist()
    assert got["target"].tolist() == reference_vote(preds, [1, 2, 3])
    disagree = int((preds != preds[:, :1]).any(axis=1).sum())
    assert f"400 rows, hard voting, voters disagreed on {disagree} rows" in r.stdout


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
    w, steps = ensemble_csv.fit_log_loss_weights([a, b], targets)
    np.testing.assert_allclose(w, [0.75, 0.25], atol=1e-9)
    assert steps < 100
    assert ensemble_csv.oof_log_loss([a, b], targets, w) == pytest.approx(-(3 * np.log(0.75) + np.log(0.25)) / 4)
    # Interior optimum of a smooth case: 8 rows where A gives the truth 0.6 and B 0.45, 2 rows where A gives 0 and
    # B 0.45. d/dw [-8 log(0.45 + 0.15 w) - 2 log(0.45 (1 - w))] = 0 at w = 0.2.
    targets = np.zeros(10, dtype=np.int64)
    a = _two_class([0.6] * 8 + [0.0] * 2, targets.tolist())
    b = _two_class([0.45] * 10, targets.tolist())
    w, _ = ensemble_csv.fit_log_loss_weights([a, b], targets)
    np.testing.assert_allclose(w, [0.2, 0.8], atol=1e-6)
    # Two copies of one model share its weight equally (the fit is symmetric and starts uniform).
    w, _ = ensemble_csv.fit_log_loss_weights([a, a, b], targets)
    np.testing.assert_allclose(w, [0.1, 0.1, 0.8], atol=1e-6)


def test_fit_log_loss_weights_beats_a_grid_search():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 5, size=200)
    runs = [rng.dirichlet(np.full(5, alpha), size=200) for alpha in (0.3, 1.0, 3.0)]
    for j, run in enumerate(runs):  # make them better than chance, each in its own way
        run[np.arange(200), targets] += 0.3 * (j + 1) * (rng.random(200) < 0.5)
        run /= run.sum(axis=1, keepdims=True)
    w, _ = ensemble_csv.fit_log_loss_weights(runs, targets)
    assert (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-12)
    best_grid = min(
        ensemble_csv.oof_log_loss(runs, targets, [i / 50, j / 50, (50 - i - j) / 50])
        for i in range(51)
        for j in range(51 - i)
    )
    assert ensemble_csv.oof_log_loss(runs, targets, w) <= best_grid + 1e-12
    # Deterministic: the same inputs give the same weights, bit for bit.
    assert np.array_equal(ensemble_csv.fit_log_loss_weights(runs, targets)[0], w)


def test_choose_oof_weights_never_below_the_best_run():
    targets = np.zeros(10, dtype=np.int64)
    # The log-loss optimum (w = 0.2, see above) puts the 8 rows at 0.48 < 0.5: accuracy 0, while A alone scores 0.8.
    # Uniform weights give 0.525 on those rows: 0.8 too, with a lower log loss than A alone, so uniform wins.
    a = _two_class([0.6] * 8 + [0.0] * 2, targets.tolist())
    b = _two_class([0.45] * 10, targets.tolist())
    fit = ensemble_csv.choose_oof_weights([a, b], targets, ["a", "b"])
    by_name = {c["name"]: c for c in fit["candidates"]}
    assert [c["name"] for c in fit["candidates"]] == ["fitted", "uniform", "only a", "only b"]
    np.testing.assert_allclose(by_name["fitted"]["weights"], [0.2, 0.8], atol=1e-6)
    assert by_name["fitted"]["oof_acc"] == 0.0 and by_name["only a"]["oof_acc"] == 0.8
    assert fit["chosen"] == "uniform" and fit["oof_acc"] == 0.8
    assert fit["weights"].tolist() == [0.5, 0.5]
    # With B at 0.35, uniform drops to 0.475 (accuracy 0) and the fit (w = 0.52) to 0.48: A alone is chosen.
    b = _two_class([0.35] * 10, targets.tolist())
    fit = ensemble_csv.choose_oof_weights([a, b], targets, ["a", "b"])
    np.testing.assert_allclose(fit["candidates"][0]["weights"], [0.52, 0.48], atol=1e-6)
    assert fit["chosen"] == "only a" and fit["weights"].tolist() == [1.0, 0.0] and fit["oof_acc"] == 0.8


def test_correctness_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=50)
    preds = rng.integers(0, 3, size=(50, 4))
    corr = ensemble_csv.correctness_correlation(preds, targets)
    expected = np.corrcoef((preds == targets[:, None]).T.astype(float))
    np.testing.assert_allclose(corr, expected, atol=1e-12)
    assert np.array_equal(corr, corr.T) and (np.diag(corr) == 1).all()
    # A run right everywhere has no variance: its correlations are undefined (NaN), its diagonal still 1.
    preds[:, 1] = targets
    corr = ensemble_csv.correctness_correlation(preds, targets)
    assert np.isnan(corr[1, [0, 2, 3]]).all() and np.isnan(corr[[0, 2, 3], 1]).all() and corr[1, 1] == 1
    agree = ensemble_csv.prediction_agreement(preds)
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
    write_probs(folder / "test_probs.csv", test_probs)
    return folder


def test_cli_fit_weights_hand_made_runs(tmp_path):
    targets = [0, 1, 0, 1]
    a = _fake_run(tmp_path / "a", _two_class([1, 1, 1, 0], targets), targets, np.array([[0.9, 0.1], [0.2, 0.8]]))
    b = _fake_run(tmp_path / "b", _two_class([0, 0, 0, 1], targets), targets, np.array([[0.1, 0.9], [0.6, 0.4]]))
    out = tmp_path / "out" / "ens.csv"
    r = run_cli(a, b / "test_probs.csv", "--fit_weights", "-o", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "ens_weights.json").read_text())
    assert report["chosen"] == "fitted"
    np.testing.assert_allclose(report["weights"], [0.75, 0.25], atol=1e-9)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["run", "OOF", "acc", "OOF", "log", "loss", "weight"]
    assert lines[1].split()[:2] == ["a", "0.7500"] and lines[1].split()[3] == "0.750000"
    assert lines[2].split()[:2] == ["b", "0.2500"] and lines[2].split()[3] == "0.250000"
    assert lines[3].startswith("ensemble OOF acc 0.7500,") and "best single run a 0.7500" in lines[3]
    # Test rows: 0.75 * A + 0.25 * B.
    expected = 0.75 * np.array([[0.9, 0.1], [0.2, 0.8]]) + 0.25 * np.array([[0.1, 0.9], [0.6, 0.4]])
    _, probs = read_probs(tmp_path / "out" / "ens_probs.csv")
    np.testing.assert_allclose(probs, expected, atol=1e-9)
    assert read_submission(out)["target"].tolist() == [0, 1]
    corr = pd.read_csv(tmp_path / "out" / "ens_corr.csv", index_col="run")
    assert corr.loc["a", "b"] == pytest.approx(-1.0) and corr.loc["a", "a"] == 1.0  # A right exactly where B is wrong


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
    report = json.loads((tmp_path / "ens_weights.json").read_text())
    weights = np.array(report["weights"])
    assert len(weights) == 3 and (weights >= 0).all() and weights.sum() == pytest.approx(1.0, abs=1e-12)
    for png in ("model_correlation.png", "model_accuracy.png"):  # the ensemble's plots, beside its report
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and min(im.size) > 200
        assert str(tmp_path / png) in r.stdout

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
    corr = pd.read_csv(tmp_path / "ens_corr.csv", index_col="run")
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
    diag = ensemble_csv.ensemble_diagnostics(names, [p for _, p in frames], targets, weights)
    assert diag["oof_acc"] == dict(zip(names, accs)) and diag["ensemble_acc"] == pytest.approx(ens_acc)
    np.testing.assert_allclose(diag["correlation"].to_numpy(), corr.to_numpy(), equal_nan=True)

    # Test side: the weighted mean of the runs' test_probs.csv, and its argmax as the submission.
    test_probs = [read_probs(run / "test_probs.csv")[1] for run in oof_runs]
    expected_probs = sum(w * p for w, p in zip(weights, test_probs))
    keys, probs = read_probs(tmp_path / "ens_probs.csv")
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
    assert json.loads((tmp_path / "again_weights.json").read_text())["weights"] == report["weights"]


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("oof.csv", "oof_probs.npy", "test_probs.csv", "summary.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


@pytest.mark.parametrize("case", ["reordered", "target", "shorter", "no_oof", "classes", "class_names"])
def test_cli_fit_weights_refuses_mismatched_runs(oof_runs, tmp_path, case):
    good = _copy_run(oof_runs[0], tmp_path / "good")
    bad = _copy_run(oof_runs[1], tmp_path / "bad")
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
    r = run_cli(good, bad, "--fit_weights", "-o", tmp_path / "ens.csv")
    _assert_refused(r, needle)
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
def test_cli_fit_weights_flag_refusals(tmp_path, extra, needle):
    targets = [0, 1]
    runs = [_fake_run(tmp_path / k, _two_class([0.7, 0.6], targets), targets, np.full((3, 2), 0.5)) for k in "ab"]
    fit = [] if extra[0] in ("--weights_out", "--corr_out") else ["--fit_weights"]
    if not fit:
        runs = [run / "test_probs.csv" for run in runs]
    r = run_cli(*runs, *fit, *extra, "-o", tmp_path / "ens.csv")
    _assert_refused(r, needle)
    assert not (tmp_path / "ens.csv").exists()


def test_cli_fit_weights_refuses_overwriting_a_run_file(tmp_path):
    targets = [0, 1]
    a, b = (_fake_run(tmp_path / k, _two_class([0.7, 0.6], targets), targets, np.full((3, 2), 0.5)) for k in "ab")
    original = (b / "oof.csv").read_bytes()
    r = run_cli(a, b, "--fit_weights", "-o", tmp_path / "ens.csv", "--corr_out", b / "oof.csv")
    _assert_refused(r, "oof.csv")
    assert (b / "oof.csv").read_bytes() == original and not (tmp_path / "ens.csv").exists()
