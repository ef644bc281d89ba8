"""The demo page (demo_app.py): its prediction functions against the run's own test prediction, its command line,
and the page itself driven in a headless Chromium, its top classes checked against inference.py's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, copy_run
from PIL import Image

import demo_app
from dataset import DataError, load_image

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def demo_run(trained_run) -> Path:
    """A finished 2-fold run on the tiny set: the session's trained run, which the demo only reads."""
    return trained_run


def test_prediction_matches_the_runs_test_prediction(demo_run, tiny_data):
    run = demo_app.load_run(demo_run, device="cpu")
    assert len(run.members) == 2
    assert run.class_names == json.loads((demo_run / "summary.json").read_text())["class_names"]
    expected = pd.read_csv(demo_run / "test_probs.csv")
    fold0 = np.load(demo_run / "fold_0" / "test_probs.npy")
    one = demo_app.load_run(demo_run, fold=0, device="cpu")
    assert [m.path for m in one.members] == [demo_run / "fold_0" / "best.pth"]
    for i, rel in enumerate(expected["image_path"][:4]):  # a few images: each costs a forward pass per fold
        data = (tiny_data / "test" / rel).read_bytes()
        probs = demo_app.predict_probs(run, data)
        # The folds' mean softmax, as written by the run itself (test_probs.csv keeps 6 significant digits).
        np.testing.assert_allclose(probs, expected.iloc[i, 2:].to_numpy(float), atol=1e-5)
        if i < 2:
            np.testing.assert_allclose(demo_app.predict_probs(one, data), fold0[i], atol=1e-6)

    data = (tiny_data / "test" / expected["image_path"][0]).read_bytes()
    table = demo_app.predict_top_k(run, data)  # k=5 with 4 classes: all of them
    probs = expected.iloc[0, 2:].to_numpy(float)
    assert list(table.columns) == ["rank", "class_name", "target", "probability"]
    assert table["rank"].tolist() == [1, 2, 3, 4]
    assert table["target"].tolist() == np.argsort(-probs, kind="stable").tolist()
    assert table["class_name"].tolist() == [run.class_names[t] for t in table["target"]]
    assert table["probability"].is_monotonic_decreasing and abs(table["probability"].sum() - 1) < 1e-5
    assert demo_app.predict_top_k(run, data, k=2)["target"].tolist() == table["target"].tolist()[:2]
    with pytest.raises(ValueError, match="k must be at least 1"):
        demo_app.predict_top_k(run, data, k=0)


def test_decode_image_matches_load_image(tiny_data, tmp_path):
    jpeg = next((tiny_data / "test").iterdir())
    # The JPEG draft (reduced-scale decoding) is what the test loader does at a small working size.
    for draft in (None, (32, 32)):
        np.testing.assert_array_equal(demo_app.decode_image(jpeg.read_bytes(), draft), load_image(jpeg, draft))
    assert demo_app.decode_image(jpeg.read_bytes(), (32, 32)).shape[0] < load_image(jpeg).shape[0]

    # Transparent strokes (as a drawing program saves them) are composited on white, grayscale goes to RGB.
    gray = np.asarray(Image.open(jpeg).convert("L"))
    rgba = Image.fromarray(np.dstack([np.zeros_like(gray)] * 3 + [255 - gray]), "RGBA")
    for name, im in (("rgba.png", rgba), ("gray.png", Image.fromarray(gray, "L"))):
        im.save(tmp_path / name)
        decoded = demo_app.decode_image((tmp_path / name).read_bytes())
        np.testing.assert_array_equal(decoded, load_image(tmp_path / name))
        assert decoded.dtype == np.uint8 and decoded.shape == (*gray.shape, 3)
    # Black strokes on transparency come out as black on white, close to the grayscale original.
    assert np.abs(demo_app.decode_image((tmp_path / "rgba.png").read_bytes())[..., 0].astype(int) - gray).max() <= 1

    for data in (b"", b"not an image", jpeg.read_bytes()[:200]):
        with pytest.raises(DataError, match=r"^upload\.png: not a readable image") as e:
            demo_app.decode_image(data, name="upload.png")
        assert "\n" not in str(e.value)


def test_command_line(demo_run, tiny_data, tmp_path, capsys):
    rel = pd.read_csv(demo_run / "test_probs.csv")["image_path"][3]
    image = tiny_data / "test" / rel
    assert demo_app.main(["--run_dir", str(demo_run), "--image", str(image), "--device", "cpu", "--top_k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{image}: 2 model(s) from {demo_run}"
    assert lines[1].split() == ["rank", "class_name", "target", "probability"]
    printed = [line.split() for line in lines[2:]]
    expected = pd.read_csv(demo_run / "test_probs.csv").iloc[3, 2:].to_numpy(float)
    order = np.argsort(-expected, kind="stable")[:3]
    assert [int(r[2]) for r in printed] == order.tolist()
    np.testing.assert_allclose([float(r[3]) for r in printed], expected[order], atol=2e-6)

    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    cases = [
        (["--run_dir", str(tmp_path), "--image", str(image)], f"{tmp_path}: no run here (args.json missing)"),
        (["--run_dir", str(demo_run), "--image", str(tmp_path / "bad.png")], f"{tmp_path / 'bad.png'}: not a "
         "readable image"),
        (["--run_dir", str(demo_run), "--image", str(tmp_path / "none.png")], "--image"),
        (["--run_dir", str(demo_run), "--image", str(image), "--fold", "7"], "fold 7 is not finished"),
        (["--run_dir", str(demo_run), "--image", str(image), "--top_k", "0"], "--top_k 0: must be at least 1"),
        (["--run_dir", str(demo_run)], "--image is required"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            demo_app.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_unfinished_fold_and_damaged_args(demo_run, tiny_data, tmp_path, capsys):
    run = copy_run(demo_run, tmp_path / "run")
    image = next((tiny_data / "test").iterdir())
    (run / "fold_1" / "done.json").unlink()  # fold 1 unfinished: the demo predicts with fold 0 alone, as inference does
    loaded = demo_app.load_run(run, device="cpu")
    assert [m.path for m in loaded.members] == [run / "fold_0" / "best.pth"] and loaded.members[0].weight == 1
    np.testing.assert_allclose(demo_app.predict_probs(loaded, image.read_bytes()),
                               demo_app.predict_probs(demo_app.load_run(demo_run, fold=0, device="cpu"),
                                                      image.read_bytes()), atol=1e-7)
    args_json = run / "args.json"
    args_json.write_bytes(args_json.read_bytes()[:30])
    with pytest.raises(SystemExit) as e:
        demo_app.main(["--run_dir", str(run), "--image", str(image), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f": error: {args_json}: damaged (" in err, err


def _page(root: str, run_dir: str) -> None:
    """The page as streamlit's script runner runs it (AppTest rebuilds this function from its source)."""
    import sys

    sys.path.insert(0, root)
    import demo_app

    demo_app.app(["--run_dir", run_dir, "--device", "cpu"])


def test_page_sidebar_without_a_browser(demo_run, tmp_path):
    from streamlit.testing.v1 import AppTest

    page = AppTest.from_function(_page, args=(str(ROOT), str(demo_run)), default_timeout=120)
    page.run()
    assert not page.exception and not page.error
    assert [c.value for c in page.sidebar.caption] == ["test_resnet, 4 classes, 32x32 px, 2 model(s) on cpu"]
    assert page.sidebar.selectbox[0].options == ["all folds (mean)", "fold 0", "fold 1"]
    assert [i.value for i in page.info] == ["Upload a sketch, or draw one, to see what the model predicts."]
    page.sidebar.selectbox[0].select("fold 1").run()
    assert [c.value for c in page.sidebar.caption] == ["test_resnet, 4 classes, 32x32 px, 1 model(s) on cpu"]
    page.sidebar.text_input[0].input(str(tmp_path)).run()  # a folder without a run: named in one error line
    assert [e.value for e in page.error] == [f"{tmp_path}: no run here (args.json missing)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_server(demo_run, tmp_path):
    """``streamlit run demo_app.py`` on a free local port, serving ``demo_run``; stopped (its whole process group)
    at the end whatever happens."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "streamlit.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "demo_app.py"),
                                 "--server.headless", "true", "--server.address", "127.0.0.1",
                                 "--server.port", str(port), "--", "--run_dir", str(demo_run), "--device", "cpu"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not up after 90 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _read_table(page) -> list[tuple[int, str, float]]:
    """(rank, class, probability) rows of the page's prediction table."""
    rows = []
    for row in page.locator('[data-testid="stTable"] tbody tr').all():
        rank, name, prob = (t.strip() for t in row.locator("td, th").all_inner_texts())
        rows.append((int(rank), name, float(prob)))
    return rows


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
def test_page_in_browser_matches_inference(demo_run, demo_server, tiny_data, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, log_path = demo_server
    expect.set_options(timeout=60_000)  # the first page load imports torch and builds the models
    # The test image the run is most sure of, so that 4 printed decimals cannot blur its top-1.
    test_probs = pd.read_csv(demo_run / "test_probs.csv")
    top2 = np.sort(test_probs.iloc[:, 2:].to_numpy(float), axis=1)[:, -2:]
    rel = test_probs["image_path"][int(np.argmax(top2[:, 1] - top2[:, 0]))]
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(tiny_data / "test" / rel, one / rel)
    class_names = json.loads((demo_run / "summary.json").read_text())["class_names"]
    # inference.py's own prediction for that image, computed while the page loads (both mostly import torch).
    inference = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), "--save_dir", str(demo_run),
                                  "--test_dir", str(one), "--output", str(tmp_path / "inference.csv"), "--device",
                                  "cpu", "--num_workers", "0"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(url)
                expect(page.get_by_text("test_resnet, 4 classes, 32x32 px, 2 model(s) on cpu")).to_be_visible()
                page.locator('input[type="file"]').set_input_files(str(one / rel))
                page.locator('[data-testid="stTable"] tbody tr').first.wait_for()
                rows = _read_table(page)
                headline = page.locator('[data-testid="stHeading"]').last.inner_text()
                expect(page.locator('[data-testid="stImage"]')).to_have_count(1)

                # A sketch drawn on the canvas: black strokes on white, predicted like an upload.
                page.get_by_text("Draw a sketch").click()
                expect(page.locator('[data-testid="stTable"]')).to_have_count(0)
                canvas = page.locator("canvas").last
                canvas.wait_for()
                box = canvas.bounding_box()
                page.mouse.move(box["x"] + 60, box["y"] + 60)
                page.mouse.down()
                for i in range(1, 20):
                    page.mouse.move(box["x"] + 60 + 10 * i, box["y"] + 60 + 30 * (i % 5), steps=2)
                page.mouse.up()
                page.locator('[data-testid="stTable"] tbody tr').first.wait_for()
                drawn = _read_table(page)

                # The sidebar's run folder: a folder without a run is named in one error line.
                field = page.get_by_role("textbox", name="Run folder")
                field.fill(str(tmp_path))
                field.press("Enter")
                expect(page.get_by_text(f"{tmp_path}: no run here (args.json missing)")).to_be_visible()
            finally:
                browser.close()
    finally:
        output = inference.communicate(timeout=300)[0]
    assert inference.returncode == 0, output

    inferred = pd.read_csv(tmp_path / "inference_probs.csv")
    assert inferred["image_path"].tolist() == [rel]
    probs = inferred.iloc[0, 2:].to_numpy(float)
    order = np.argsort(-probs, kind="stable")[:5]
    assert [r[0] for r in rows] == list(range(1, min(5, len(class_names)) + 1))
    assert [r[1] for r in rows] == [class_names[i] for i in order], (rows, probs)
    np.testing.assert_allclose([r[2] for r in rows], probs[order], atol=1e-3)
    assert headline.startswith(f"{class_names[order[0]]} ("), headline

    assert sorted(r[1] for r in drawn) == sorted(class_names)  # 4 classes: all of them, once each
    assert [r[2] for r in drawn] == sorted((r[2] for r in drawn), reverse=True)
    assert abs(sum(r[2] for r in drawn) - 1) < 2e-3
    assert "Traceback" not in log_path.read_text()
