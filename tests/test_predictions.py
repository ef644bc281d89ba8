"""Tests of predictions.py: the submission and probability CSV formats, written and read back, and every refusal."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ensemble_csv
import predictions
from predictions import PredictionFileError, read_prediction_file, read_probs, read_submission

REPO = Path(__file__).resolve().parents[1]

PROBS = "ID,image_path,prob_0,prob_1,prob_2\n0,a.png,0.7,0.2,0.1\n1,b.png,0.1,0.3,0.6\n2,c.png,0.25,0.5,0.25\n"
SUB = "ID,image_path,target\n0,a.png,0\n1,b.png,2\n2,c.png,1\n"


def _file(tmp_path: Path, text: str, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(path: Path, reader=read_prediction_file) -> str:
    with pytest.raises(PredictionFileError) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading back
# ----------------------------------------------------------------------------------------------------------------


def test_write_probs_and_submission_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=30)
    paths = [f"d/{i}.png" for i in range(30)]
    predictions.write_probs(probs, paths, tmp_path / "p.csv")
    header, first = (tmp_path / "p.csv").read_text().splitlines()[:2]
    assert header == "ID,image_path,prob_0,prob_1,prob_2,prob_3,prob_4"
    assert first == "0,d/0.png," + ",".join(f"{v:.6g}" for v in probs[0].astype(np.float32))  # float32, 6 digits
    keys, back = read_probs(tmp_path / "p.csv")
    assert keys["ID"].tolist() == list(range(30)) and keys["image_path"].tolist() == paths
    assert back.dtype == np.float64 and np.abs(back - probs).max() < 1e-6

    df = predictions.write_submission(probs, paths, tmp_path / "s.csv")
    assert list(df.columns) == ["ID", "image_path", "target"] and df["target"].tolist() == probs.argmax(1).tolist()
    assert (tmp_path / "s.csv").read_text().splitlines()[1] == f"0,d/0.png,{probs[0].argmax()}"
    sub = read_submission(tmp_path / "s.csv")
    pd.testing.assert_frame_equal(sub, df)
    assert [str(t) for t in sub.dtypes] == ["int64", str(sub["image_path"].dtype), "int64"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left


def test_columns_are_read_by_name(tmp_path):
    # Class order follows the prob_<k> names, not the column positions; the key columns may stand anywhere too.
    swapped = _file(tmp_path, "ID,image_path,prob_1,prob_0\n0,a.png,0.2,0.8\n1,b.png,0.9,0.1\n")
    keys, probs = read_probs(swapped)
    assert probs.tolist() == [[0.8, 0.2], [0.1, 0.9]] and keys["image_path"].tolist() == ["a.png", "b.png"]
    shuffled = _file(tmp_path, "prob_2,image_path,prob_0,ID,prob_1\n0.1,a.png,0.7,5,0.2\n", "shuffled.csv")
    keys, probs = read_probs(shuffled)
    assert probs.tolist() == [[0.7, 0.2, 0.1]] and keys["ID"].tolist() == [5]
    sub = read_submission(_file(tmp_path, "target,ID,image_path\n3,0,a.png\n1,1,b.png\n", "sub.csv"))
    assert list(sub.columns) == ["ID", "image_path", "target"] and sub["target"].tolist() == [3, 1]
    # Spaces around header names and cells, a byte-order mark and blank lines are tolerated.
    loose = _file(tmp_path, "\ufeffID , image_path, target\n 0 ,a.png, 2 \n\n1,b.png,0\n", "loose.csv")
    assert read_submission(loose)["target"].tolist() == [2, 0]


def test_probabilities_a_little_off_are_accepted(tmp_path):
    # float32 "%.6g" cells: each row misses 1 by ~1e-6, and one cell may exceed 1 by a rounding step.
    path = _file(tmp_path, "ID,image_path,prob_0,prob_1\n0,a.png,0.333334,0.666667\n1,b.png,1.00001,0\n")
    assert read_probs(path)[1].shape == (2, 2)


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line naming the file, the row and the column
# ----------------------------------------------------------------------------------------------------------------

REFUSED = {
    # case: (file text, message after "PATH: ")
    "abc_cell": (PROBS.replace("0.1,0.3,0.6", "0.1,abc,0.6"), "row 1 (ID 1): prob_1 'abc' is not a number"),
    "empty_cell": (PROBS.replace("0.1,0.3,0.6", "0.1,,0.6"), "row 1 (ID 1): prob_1 '' is missing or NaN"),
    "nan_cell": (PROBS.replace("0.1,0.3,0.6", "0.1,nan,0.6"), "row 1 (ID 1): prob_1 'nan' is missing or NaN"),
    "inf_cell": (PROBS.replace("0.1,0.3,0.6", "inf,0.3,0.6"), "row 1 (ID 1): prob_0 'inf' is not finite"),
    "negative_prob": (PROBS.replace("0.7,0.2,0.1", "0.6,-0.1,0.5"),
                      "row 0 (ID 0): prob_1 '-0.1' is not a probability in [0, 1]"),
    "above_one": (PROBS.replace("0.7,0.2,0.1", "0,1.5,0"), "row 0 (ID 0): prob_1 '1.5' is not a probability in [0, 1]"),
    "sum_zero": (PROBS.replace("0.25,0.5,0.25", "0,0,0"),
                 "row 2 (ID 2): probabilities sum to 0, not 1 (tolerance 0.001)"),
    "sum_1.8": (PROBS.replace("0.1,0.3,0.6", "0.6,0.6,0.6"),
                "row 1 (ID 1): probabilities sum to 1.8, not 1 (tolerance 0.001)"),
    "swapped_sum": ("ID,image_path,prob_1,prob_0\n0,a.png,0.2,0.9\n",
                    "row 0 (ID 0): probabilities sum to 1.1, not 1 (tolerance 0.001)"),
    "duplicate_id": (SUB.replace("2,c.png", "0,c.png"), "row 2: ID 0 repeats row 0; IDs must be unique"),
    "negative_id": (SUB.replace("1,b.png", "-1,b.png"), "row 1: ID -1 is negative"),
    "word_id": (SUB.replace("1,b.png", "one,b.png"), "row 1: ID 'one' is not an integer"),
    "float_id": (PROBS.replace("2,c.png", "2.0,c.png"), "row 2: ID '2.0' is not an integer"),
    "huge_id": (SUB.replace("1,b.png", "99999999999999999999999,b.png"),
                "row 1: ID 99999999999999999999999 does not fit a 64-bit integer"),
    "huge_target": (SUB.replace("b.png,2", "b.png,99999999999999999999999"),
                    "row 1 (ID 1): target 99999999999999999999999 does not fit a 64-bit integer"),
    "negative_target": (SUB.replace("b.png,2", "b.png,-2"), "row 1 (ID 1): target -2 is negative"),
    "float_target": (SUB.replace("b.png,2", "b.png,1.5"), "row 1 (ID 1): target '1.5' is not an integer"),
    "nan_target": (SUB.replace("b.png,2", "b.png,NaN"), "row 1 (ID 1): target 'NaN' is missing or NaN"),
    "empty_path": (SUB.replace("1,b.png", "1, "), "row 1 (ID 1): image_path is empty"),
    "missing_prob_index": (PROBS.replace("prob_1", "prob_3"),
                           "no column prob_1; a probability file needs prob_0..prob_3 with no gap"),
    "no_prob_0": (PROBS.replace("prob_0", "prob_3"),
                  "no column prob_0; a probability file needs prob_0..prob_3 with no gap"),
    "huge_prob_index": (PROBS.replace("prob_2", "prob_99999999999999999999"),
                        "no column prob_2; a probability file needs prob_0..prob_99999999999999999999 with no gap"),
    "duplicate_prob_index": (PROBS.replace("prob_2", "prob_01"), "columns prob_1 and prob_01 both hold class 1"),
    "duplicate_column": (PROBS.replace("prob_2", "prob_1"), "column 'prob_1' appears twice in the header"),
    "target_and_probs": (PROBS.replace("prob_2", "target"),
                         "wrong columns ID,image_path,prob_0,prob_1,target; expected ID,image_path,target (a "
                         "submission) or ID,image_path,prob_0,...,prob_{C-1} (a probability file)"),
    "extra_column": (SUB.replace("target", "target,fold").replace(".png,", ".png,0,"),
                     "wrong columns ID,image_path,target,fold; expected ID,image_path,target (a submission) or "
                     "ID,image_path,prob_0,...,prob_{C-1} (a probability file)"),
    "no_id": ("image_path,prob_0\na.png,1\n", "wrong columns image_path,prob_0; expected ID,image_path,target (a "
              "submission) or ID,image_path,prob_0,...,prob_{C-1} (a probability file)"),
    "ragged": (SUB.replace("1,b.png,2", "1,b.png,2,7"), "row 1 has 4 fields but the header has 3"),
    "header_only": ("ID,image_path,target\n", "file has a header but no rows"),
    "empty": ("", "file is empty"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_reader_refusals(tmp_path, case):
    text, expected = REFUSED[case]
    assert _refused(_file(tmp_path, text)) == expected


def test_reader_refuses_missing_and_unreadable_files(tmp_path):
    assert _refused(tmp_path / "gone.csv") == "file not found"
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81garbage\n")
    assert _refused(tmp_path / "binary.csv").startswith("cannot read it as CSV (")
    (tmp_path / "folder.csv").mkdir()
    assert _refused(tmp_path / "folder.csv").startswith("cannot read it as CSV (")


def test_kind_specific_readers(tmp_path):
    probs, sub = _file(tmp_path, PROBS, "p.csv"), _file(tmp_path, SUB, "s.csv")
    assert _refused(sub, read_probs) == "is a submission, not a probability file (ID,image_path,prob_0,...)"
    assert _refused(probs, read_submission) == "is a probability file, not a submission (ID,image_path,target)"
    assert read_prediction_file(probs).kind == "probs" and read_prediction_file(sub).kind == "submission"
    assert issubclass(PredictionFileError, ValueError) and ensemble_csv.EnsembleError is PredictionFileError


# ----------------------------------------------------------------------------------------------------------------
# The command line refuses the same files: exit 2, one line, nothing written
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["abc_cell", "duplicate_id", "negative_id", "sum_zero", "sum_1.8", "huge_target",
                                  "missing_prob_index"])
def test_cli_refuses_damaged_inputs_in_one_line(tmp_path, capsys, case):
    text, expected = REFUSED[case]
    good = _file(tmp_path, SUB if "target" in text.splitlines()[0] else PROBS, "good.csv")
    bad = _file(tmp_path, text, "bad.csv")
    with pytest.raises(SystemExit) as info:
        ensemble_csv.main([str(good), str(bad), "-o", str(tmp_path / "out.csv")])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"ensemble_csv.py: error: {bad}: {expected}\n"
    assert not (tmp_path / "out.csv").exists()


def test_cli_exit_code_and_swapped_columns_as_a_script(tmp_path):
    # As a process: a huge target gives exit code 2 and one line, not an OverflowError traceback.
    good, bad = _file(tmp_path, SUB, "good.csv"), _file(tmp_path, REFUSED["huge_target"][0], "bad.csv")
    r = subprocess.run([sys.executable, "ensemble_csv.py", good, bad, "-o", tmp_path / "out.csv"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"ensemble_csv.py: error: {bad}: {REFUSED['huge_target'][1]}\n"
    # A probability file with its columns in another order votes by class name.
    other = _file(tmp_path, "ID,image_path,prob_2,prob_1,prob_0\n0,a.png,0.1,0.2,0.7\n1,b.png,0.6,0.3,0.1\n"
                  "2,c.png,0.25,0.5,0.25\n", "other.csv")
    r = subprocess.run([sys.executable, "ensemble_csv.py", _file(tmp_path, PROBS, "p.csv"), other, "-o",
                        tmp_path / "out.csv", "--probs_out", tmp_path / "mean.csv"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert read_submission(tmp_path / "out.csv")["target"].tolist() == [0, 2, 1]
    np.testing.assert_allclose(read_probs(tmp_path / "mean.csv")[1], read_probs(tmp_path / "p.csv")[1])


def test_imports_only_stdlib_numpy_pandas_and_light_modules():
    tree = ast.parse((REPO / "predictions.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module}
    assert modules - set(sys.stdlib_module_names) == {"numpy", "pandas", "fileio", "errors"}
