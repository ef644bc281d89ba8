"""soup.py on real tiny runs: uniform and greedy soups, held-out accuracies, inference.py on the soup, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, copy_run, data_args, files_of, run_cli

import inference
import soup
from augmentation import create_transform
from checkpoints import load_checkpoint
from dataset import ImageDataset
from engine import make_loader, predict_logits, resolve_amp
from model import create_model


@pytest.fixture(scope="module")
def runs(trained_run, tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two runs of one 2-fold split (same seed: same folds, same initial weights), two learning rates: the session's
    trained run (learning rate 1e-3, both folds; read only) and fold 0 alone at 3e-3."""
    root = tmp_path_factory.mktemp("soup_runs")
    run_cli("main.py", *FAST, *data_args(tiny_data), "--kfold", "2", "--fold", "0", "--max_epochs", "2",
            "--learning_rate", "3e-3", "--save_dir", root / "lr3e-3", "--output_dir", root / "outputs")
    return trained_run, root / "lr3e-3"


def _holdout(run: Path, fold: int = 0) -> pd.DataFrame:
    folds = pd.read_csv(run / "folds.csv")
    return folds[folds["fold"] == fold].reset_index(drop=True)


def _accuracy(ckpt_path: Path, run: Path, train_dir: Path, batch_size: int = 16) -> float:
    """Held-out accuracy of a checkpoint on fold 0's validation images, computed here with the suite's parts."""
    ckpt = load_checkpoint(ckpt_path)
    model = create_model(ckpt["model_name"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    model.to(memory_format=torch.channels_last)
    device = torch.device("cpu")
    img_size = tuple(ckpt["img_size"])
    rows = _holdout(run)
    dataset = ImageDataset([str(train_dir / p) for p in rows["image_path"]], rows["target"].to_numpy().copy(),
                           create_transform(img_size, False, **ckpt["data_config"]), img_size)
    logits, targets = predict_logits(model, make_loader(dataset, batch_size, 0, device), device,
                                     resolve_amp("auto", device, model), True)
    return float((logits.argmax(1) == targets).float().mean())


def _ingredient_lines(stdout: str) -> dict[str, str]:
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["ingredient", "held-out", "acc"]
    return {line.split()[0]: line for line in lines[1:-1]}


def test_uniform_soup_of_identical_checkpoints_is_the_checkpoint(runs, tiny_data, tmp_path):
    run = runs[0]
    best = run / "fold_0" / "best.pth"
    copies = []
    for name in ("a.pth", "b.pth", "c.pth"):
        shutil.copyfile(best, tmp_path / name)
        copies.append(tmp_path / name)
    holdout_csv = tmp_path / "holdout.csv"
    _holdout(run)[["image_path", "target"]].to_csv(holdout_csv, index=False)
    out = tmp_path / "soup.pth"
    r = run_cli("soup.py", *copies, "--method", "uniform", "--holdout_csv", holdout_csv, "--holdout_dir",
                tiny_data / "train", "--device", "cpu", "--num_workers", "0", "--batch_size", "16", "-o", out)

    original, cooked = load_checkpoint(best), load_checkpoint(out)
    assert list(cooked) == list(original)  # the trainer's keys, in its order
    assert list(cooked["model"]) == list(original["model"])
    for name, tensor in original["model"].items():
        assert cooked["model"][name].dtype == tensor.dtype and torch.equal(cooked["model"][name], tensor), name
    assert cooked["model_name"] == original["model_name"] and cooked["epoch"] == original["epoch"]

    # The held-out accuracy of the checkpoint is the one the trainer measured for its best epoch.
    val_acc = json.loads((run / "fold_0" / "done.json").read_text())["val_acc"]
    n = len(_holdout(run))
    right = round(val_acc * n)
    lines = _ingredient_lines(r.stdout)
    assert list(lines) == [str(p) for p in copies]
    for line in lines.values():
        assert line.split()[1:] == [f"{val_acc:.4f}", f"({right}/{n})", "*"]
    assert f"uniform soup of 3/3 ingredients (*): held-out accuracy {val_acc:.4f} ({right}/{n})" in r.stdout
    recipe = json.loads(out.with_suffix(".json").read_text())
    assert recipe["soup_holdout_acc"] == val_acc and recipe["holdout_images"] == n
    assert recipe["members"] == [str(p) for p in copies] and recipe["recompute_bn"] is False

    # inference.py predicts with the soup exactly as with the checkpoint it was cooked from.
    common = ["--save_dir", str(run), "--device", "cpu", "--num_workers", "0"]
    assert inference.main([*common, "--checkpoint", str(out), "--output", str(tmp_path / "soup_sub.csv")]) == 0
    assert inference.main([*common, "--checkpoint", str(best), "--output", str(tmp_path / "best_sub.csv")]) == 0
    sub = pd.read_csv(tmp_path / "soup_sub.csv")
    assert list(sub.columns) == ["ID", "image_path", "target"] and len(sub) == 10
    assert (tmp_path / "soup_sub_probs.csv").read_bytes() == (tmp_path / "best_sub_probs.csv").read_bytes()
    assert (tmp_path / "soup_sub.csv").read_bytes() == (tmp_path / "best_sub.csv").read_bytes()


def test_greedy_soup_never_below_its_best_ingredient(runs, tiny_data, tmp_path):
    out = tmp_path / "greedy.pth"
    r = run_cli("soup.py", *runs, "--method", "greedy", "--device", "cpu", "--num_workers", "0", "--batch_size",
                "16", "-o", out)
    recipe = json.loads(out.with_suffix(".json").read_text())
    files = soup.expand_inputs(list(runs), 0)
    assert [i["path"] for i in recipe["ingredients"]] == [str(p) for p in files]
    assert len(files) >= 3  # best.pth and last.pth of each run, once when they are the same file

    # Each ingredient's printed accuracy, recomputed here; best.pth's equals the trainer's own val_acc.
    lines = _ingredient_lines(r.stdout)
    n = len(_holdout(runs[0]))
    accs = {}
    for ing in recipe["ingredients"]:
        acc = _accuracy(Path(ing["path"]), runs[0], tiny_data / "train")
        accs[ing["path"]] = acc
        assert ing["holdout_acc"] == pytest.approx(acc, abs=1e-12)
        assert lines[ing["path"]].split()[1:3] == [f"{acc:.4f}", f"({round(acc * n)}/{n})"]
        if ing["path"].endswith("best.pth"):
            done = json.loads((Path(ing["path"]).parent / "done.json").read_text())
            assert acc == pytest.approx(done["val_acc"], abs=1e-12)

    # The invariant of greedy soups, and the recipe's bookkeeping.
    best = max(accs.values())
    assert recipe["soup_holdout_acc"] >= best
    ranked = sorted(accs, key=lambda p: -accs[p])
    assert recipe["members"][0] == ranked[0] and recipe["base"] == ranked[0]
    assert {i["path"] for i in recipe["ingredients"] if i["in_soup"]} == set(recipe["members"])

    # The soup's weights are the uniform average of its members; its accuracy is the printed one.
    states = [load_checkpoint(Path(p))["model"] for p in recipe["members"]]
    cooked = load_checkpoint(out)
    for name, tensor in cooked["model"].items():
        if tensor.is_floating_point():
            expected = (sum(s[name].double() for s in states) / len(states)).to(tensor.dtype)
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
        else:
            assert torch.equal(tensor, states[0][name]), name
    soup_acc = _accuracy(out, runs[0], tiny_data / "train")
    assert recipe["soup_holdout_acc"] == pytest.approx(soup_acc, abs=1e-12)
    assert f"held-out accuracy {soup_acc:.4f}" in r.stdout.splitlines()[-1]

    assert inference.main(["--save_dir", str(runs[0]), "--checkpoint", str(out), "--device", "cpu", "--num_workers",
                           "0", "--output", str(tmp_path / "sub.csv")]) == 0
    probs = pd.read_csv(tmp_path / "sub_probs.csv")
    assert list(probs.columns) == ["ID", "image_path", "prob_0", "prob_1", "prob_2", "prob_3"] and len(probs) == 10
    np.testing.assert_allclose(probs.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)


def test_greedy_soup_with_recomputed_batch_norm(runs, tmp_path):
    out = tmp_path / "bn.pth"
    r = run_cli("soup.py", runs[0] / "fold_0" / "best.pth", runs[1] / "fold_0" / "best.pth", "--recompute_bn",
                "--device", "cpu", "--num_workers", "0", "-o", out)
    recipe = json.loads(out.with_suffix(".json").read_text())
    assert recipe["soup_holdout_acc"] >= max(i["holdout_acc"] for i in recipe["ingredients"])
    cooked = load_checkpoint(out)["model"]
    if len(recipe["members"]) > 1:
        assert recipe["recompute_bn"] is True
        states = [load_checkpoint(Path(p))["model"] for p in recipe["members"]]
        # Weights are averaged; running statistics are re-estimated, not averaged.
        averaged = (states[0]["conv1.0.weight"] + states[1]["conv1.0.weight"]) / 2
        torch.testing.assert_close(cooked["conv1.0.weight"], averaged, rtol=0, atol=1e-6)
        assert not torch.allclose(cooked["bn1.running_var"], (states[0]["bn1.running_var"] +
                                                              states[1]["bn1.running_var"]) / 2)
    else:  # the greedy soup kept the best ingredient alone: it is that checkpoint, untouched
        assert torch.equal(cooked["bn1.running_var"], load_checkpoint(Path(recipe["members"][0]))["model"][
            "bn1.running_var"])
    assert "greedy soup of" in r.stdout


def test_average_state_dicts_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16),
         "n": torch.tensor(7, dtype=torch.long)}
    b = {"w": torch.tensor([3.0, 5.0]), "h": torch.tensor([2.0], dtype=torch.float16),
         "n": torch.tensor(9, dtype=torch.long)}
    avg = soup.average_state_dicts([a, b])
    assert avg["w"].tolist() == [2.0, 3.5] and avg["h"].dtype == torch.float16 and avg["h"].item() == 1.5
    assert avg["n"].item() == 7 and avg["n"].dtype == torch.long  # integer buffers: the first ingredient's
    x = {"w": torch.randn(5, 3)}
    assert torch.equal(soup.average_state_dicts([x, x, x])["w"], x["w"])


# ----------------------------------------------------------------------------------------------- refusals
def _variant(src: Path, dst: Path, **changes) -> Path:
    ckpt = load_checkpoint(src)
    ckpt.update(changes)
    torch.save(ckpt, dst)
    return dst


def _refusal_case(case: str, runs: tuple[Path, Path], tmp_path: Path) -> tuple[list, str]:
    best = runs[0] / "fold_0" / "best.pth"
    other = runs[1] / "fold_0" / "best.pth"
    if case == "architecture":
        state = create_model("test_efficientnet", 4).state_dict()
        bad = _variant(best, tmp_path / "effnet.pth", model_name="test_efficientnet", model=state)
        return [best, bad], "effnet.pth: model_name 'test_efficientnet'"
    if case == "classes":
        bad = _variant(best, tmp_path / "five.pth", num_classes=5, model=create_model("test_resnet", 5).state_dict())
        return [best, bad], "five.pth: num_classes 5"
    if case == "incomplete":  # both lack the same tensor: they match each other, not the model they name
        dropped = "layer2.0.bn1.running_var"
        bad = [_variant(src, tmp_path / f"{name}.pth", predict_with="model",
                        model={k: v for k, v in load_checkpoint(src)["model"].items() if k != dropped})
               for src, name in ((best, "a"), (other, "b"))]
        return bad, f"a.pth: its weights do not fill test_resnet (1 of its 92 tensors missing or of another shape, " \
                    f"first: {dropped}); a soup averages complete checkpoints"
    if case == "img_size":
        return [best, _variant(best, tmp_path / "big.pth", img_size=[64, 64])], "big.pth: img_size"
    if case == "not_a_checkpoint":
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
        return [best, tmp_path / "junk.pth"], "junk.pth: not a checkpoint"
    if case == "missing":
        return [best, tmp_path / "gone.pth"], "gone.pth: file not found"
    if case == "one":
        return [best], "only one checkpoint"
    if case == "other_fold":
        return [best, _variant(other, tmp_path / "f1.pth", fold=1)], "f1.pth: trained with fold 1 held out"
    if case == "other_split":
        args = {**load_checkpoint(other)["args"], "seed": 5}
        return [best, _variant(other, tmp_path / "s5.pth", args=args)], "s5.pth: cannot tell"
    if case == "no_fold_dir":
        return [runs[0], runs[1], "--fold", "1"], "no fold_1/best.pth"
    if case == "holdout_pair":
        return [best, other, "--holdout_csv", tmp_path / "h.csv"], "--holdout_csv and --holdout_dir"
    if case == "holdout_target":
        (tmp_path / "h.csv").write_text("image_path,target\n" + f"{_holdout(runs[0])['image_path'][0]},4\n")
        train_dir = json.loads((runs[0] / "args.json").read_text())["train_dir"]
        needle = "h.csv: 1 bad row(s): line 2: target"
        return [best, other, "--holdout_csv", tmp_path / "h.csv", "--holdout_dir", train_dir], needle
    if case == "output_is_input":
        copy = tmp_path / "copy.pth"
        shutil.copyfile(other, copy)
        return [best, copy, "-o", copy], f"--output {copy}: is one of the inputs"
    if case == "method":
        return [best, other, "--method", "mean"], "--method"
    raise AssertionError(case)


REFUSALS = ["architecture", "classes", "incomplete", "img_size", "not_a_checkpoint", "missing", "one", "other_fold",
            "other_split", "no_fold_dir", "holdout_pair", "holdout_target", "output_is_input", "method"]


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal(runs, tmp_path, case, capsys):
    args, needle = _refusal_case(case, runs, tmp_path)
    if "-o" not in args:
        args += ["-o", tmp_path / "soup.pth"]
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as e:
        soup.main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soup.py: error: ") and needle in lines[0], err.err
    assert err.out == ""
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written


def test_refusal_from_the_command_line(runs, tmp_path):
    bad = _variant(runs[0] / "fold_0" / "best.pth", tmp_path / "five.pth", num_classes=5,
                   model=create_model("test_resnet", 5).state_dict())
    r = run_cli("soup.py", runs[0], bad, "-o", tmp_path / "soup.pth", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "five.pth: num_classes 5" in r.stderr
    assert not (tmp_path / "soup.pth").exists()


# ----------------------------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def target_run(runs, tmp_path_factory) -> Path:
    """A copy of the trained run that the soup outputs below are aimed at (and must leave alone)."""
    return copy_run(runs[0], tmp_path_factory.mktemp("soup_target") / "run")


def _output_case(case: str, run: Path, other: Path, tmp_path: Path) -> tuple[list, str]:
    """(soup.py arguments, the start of the refusal after 'soup.py: error: ') aiming the output at a run file."""
    best = run / "fold_0" / "best.pth"
    if case == "checkpoint_input":  # the run folder stands for its fold_0/best.pth, the output
        return [run, other, "-o", best], f"--output {best}: is one of the inputs"
    if case == "checkpoint":
        return [best, other, "-o", run / "fold_1" / "best.pth"], f"--output {run / 'fold_1' / 'best.pth'}: is a file " \
            f"of the run folder {run}"
    if case == "done_sidecar":  # the recipe of RUN/fold_0/done.pth would be RUN/fold_0/done.json
        return [best, other, "-o", run / "fold_0" / "done.pth"], f"--output {run / 'fold_0' / 'done.pth'}: is a file " \
            f"of the run folder {run}"
    if case in ("summary_sidecar", "args_sidecar"):  # a free name, whose recipe is a file of the run
        name = case.split("_")[0]
        return [best, other, "-o", run / f"{name}.pth"], f"its recipe {run / f'{name}.json'}: is a file of the run " \
            f"folder {run}"
    if case in ("test_probs", "submission"):
        return [best, other, "-o", run / f"{case}.csv"], f"--output {run / f'{case}.csv'}: is a file of the run folder"
    if case == "holdout_csv":
        holdout = tmp_path / "holdout.pth"
        _holdout(run)[["image_path", "target"]].to_csv(holdout, index=False)
        return [best, other, "--holdout_csv", holdout, "--holdout_dir", tmp_path, "-o", holdout], \
            f"--output {holdout}: is one of the inputs"
    if case == "run_folder":
        return [best, other, "-o", run], f"--output {run}: is a folder"
    raise AssertionError(case)


OUTPUTS = ["checkpoint_input", "checkpoint", "done_sidecar", "summary_sidecar", "args_sidecar", "test_probs",
           "submission", "holdout_csv", "run_folder"]


@pytest.mark.parametrize("case", OUTPUTS)
def test_output_on_a_run_file_or_an_input_is_refused(runs, target_run, tmp_path, case, capsys):
    args, needle = _output_case(case, target_run, runs[1] / "fold_0" / "best.pth", tmp_path)
    before, others = files_of(target_run), files_of(tmp_path)
    with pytest.raises(SystemExit) as e:
        soup.main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"soup.py: error: {needle}"), err.err
    assert err.out == "" and "Traceback" not in err.err
    assert files_of(target_run) == before  # every run file byte for byte, and nothing added
    assert files_of(tmp_path) == others


def test_output_on_done_json_from_the_command_line(runs, target_run):
    done = target_run / "fold_0" / "done.json"
    before = files_of(target_run)
    r = run_cli("soup.py", target_run / "fold_0" / "best.pth", runs[1] / "fold_0" / "best.pth", "-o",
                done.with_suffix(".pth"), "--device", "cpu", check=False)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "error:" in r.stderr
    assert "is a file of the run folder" in r.stderr
    assert files_of(target_run) == before
    assert json.loads(done.read_text())["fold"] == 0  # still the fold's record, not a recipe


def test_damaged_args_json_is_one_line(runs, tmp_path, capsys):
    run = copy_run(runs[1], tmp_path / "run")
    args_json = run / "args.json"
    args_json.write_bytes(args_json.read_bytes()[:40])
    with pytest.raises(SystemExit) as e:
        soup.main([str(run), "--device", "cpu", "--num_workers", "0", "-o", str(tmp_path / "soup.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"soup.py: error: {args_json}: damaged ("), err
    assert not (tmp_path / "soup.pth").exists()
