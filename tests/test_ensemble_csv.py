"""Tests of ensemble_csv.py: exact hard and soft voting, the tie rule, and every refusal (exit 2, nothing written).

The reader's own checks are tested in test_predictions.py, the --fit_weights path in test_ensemble_fit.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import assert_refused, call_main  # noqa: E402

import ensemble_csv  # noqa: E402
from ensemble_csv import EnsembleError, hard_vote, soft_vote  # noqa: E402
from predictions import read_probs, read_submission  # noqa: E402

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
    if case == "mixed_kinds_weights":  # one weight per input: a probability file among them cannot be skipped
        return [a, b, p1, "--weights", "1", "1", "1"], "p1.csv"
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
    "mixed_kinds_weights",
    "class_counts",
    "nan_prob",
    "weights_count",
    "weights_negative",
    "weights_zero",
    "probs_out_hard",
]


def run_main(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """``ensemble_csv.main(args)`` in this process."""
    return call_main(ensemble_csv.main, capsys, *args)


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal(tmp_path, capsys, case):
    args, needle = _case(tmp_path, case)
    out = tmp_path / "out.csv"
    out.write_bytes(SENTINEL)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    r = run_main(capsys, *args, "-o", out)
    assert_refused(r, needle)
    assert out.read_bytes() == SENTINEL
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after == before  # no new file (no probs_out, no temporary left behind), nothing touched


def test_cli_skips_probability_files_among_submissions(subs, tmp_path, caplog):
    """``outputs/*.csv`` may catch an ``inference.py --output`` file's ``_probs.csv`` sibling: it is skipped, named."""
    a, b = subs[:2]
    probs = write_probs(tmp_path / "x_probs.csv", np.full((len(pd.read_csv(a)), 3), 1 / 3))
    out = tmp_path / "vote.csv"
    with caplog.at_level(logging.WARNING, logger="ensemble_csv"):
        assert ensemble_csv.main([str(a), str(probs), str(b), "-o", str(out)]) == 0
    both = ensemble_csv.main([str(a), str(b), "-o", str(tmp_path / "both.csv")])
    assert both == 0 and out.read_bytes() == (tmp_path / "both.csv").read_bytes()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"{probs}: skipped, a probability file among submissions (vote probability files alone for "
                       "soft voting)"]


@pytest.mark.parametrize("option", ["-o", "--probs_out"])
def test_refusal_output_is_an_input(tmp_path, capsys, option):
    p1 = write_probs(tmp_path / "p1.csv", np.full((4, 3), 1 / 3))
    p2 = write_probs(tmp_path / "p2.csv", np.full((4, 3), 1 / 3))
    original = p2.read_bytes()
    extra = ["-o", tmp_path / "out.csv"] if option == "--probs_out" else []
    r = run_main(capsys, p1, p2, option, p2, *extra)
    assert_refused(r, "p2.csv")
    assert p2.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.csv", "p2.csv"]


def test_refusal_output_is_an_input_via_other_spelling(subs, tmp_path):
    a = subs[0]
    original = a.read_bytes()
    r = run_cli(*subs, "-o", tmp_path / "sub" / ".." / "a.csv")
    assert_refused(r, "a.csv")
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
