"""tools/serve.py: two tasks on one backbone answer over HTTP exactly what Predictor answers for each run; bad
requests get their 4xx and a JSON message while the server keeps serving; tasks of different bases are refused."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
from conftest import load_tool
from PIL import Image, PngImagePlugin

from visionlora.cli import main as train_main
from visionlora.data import digits_split
from visionlora.lora import LoraConfig, inject_lora, save_adapter
from visionlora.predict import Predictor
from visionlora.serve import ServeError, build_tasks, resolve_tasks
from visionlora.serve.api import classify_mixed
from visionlora.serve.batch_log import read_batch_log
from visionlora.serve.process import free_port, stop_group, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
TOOL = load_tool("serve")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TASKS = ("novel", "base")  # the digits 5-9 and 0-4, each a task trained from the bundled ConvNet
MAX_BYTES, MAX_PIXELS = 20_000, 1024
START_SECONDS, REQUEST_SECONDS = 120, 30


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two epochs of the default task on each class split: two adapters + heads on one base."""
    folder = tmp_path_factory.mktemp("runs")
    found = {}
    for classes in TASKS:
        train_main(["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.max_epochs", "2",
                    "--data.classes", classes, *QUIET, "--runs_dir", str(folder), "--run_name", classes])
        (found[classes],) = sorted((folder / classes).iterdir())
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """Test digits of each task as files: PNGs (lossless) and one JPEG each."""
    folder = tmp_path_factory.mktemp("images")
    found = {}
    for classes in TASKS:
        pictures, _, _ = digits_split(classes, "test")
        paths = []
        for index in range(6):
            path = folder / f"{classes}_{index}.{'jpg' if index == 5 else 'png'}"
            Image.fromarray(pictures[index * 7]).save(path)
            paths.append(path)
        found[classes] = paths
    return found


def call(url: str, body: bytes | None = None) -> tuple[int, dict | str]:
    """Status and answer (parsed JSON, else text: LitServe's /health answers "ok") of a GET or, with a body, a POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


def predict_body(task: str, image: bytes | str, **extra) -> bytes:
    text = image if isinstance(image, str) else base64.b64encode(image).decode()
    return json.dumps({"task": task, "image": text, **extra}).encode()


@dataclass
class Server:
    url: str
    log: Path  # its stdout and stderr: with --log-batches, one line per forward pass

    def batches(self) -> list[dict[str, int]]:
        """Requests per task of every forward pass so far (--log-batches lines)."""
        return read_batch_log(self.log.read_text())


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory) -> Server:
    """tools/serve.py in a subprocess on a free port of 127.0.0.1; stopped afterwards, with every process it started.

    LitServe runs inference in worker processes of its own; terminating only the main process left them running.
    The server gets a session (process group) of its own, and the whole group is stopped and checked gone
    (visionlora.serve.process).
    """
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, str(ROOT / "tools" / "serve.py"), *[f"--task={t}={runs[t]}" for t in TASKS],
               "--port", str(port), "--batch-timeout", "0.05", "--max-bytes", str(MAX_BYTES),
               "--max-pixels", str(MAX_PIXELS), "--accelerator", "cpu", "--log-batches"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until_healthy(url, process, log, START_SECONDS)
        yield Server(url, log)
    finally:
        stop_group(process)


def expected_answers(runs, images, top_k: int = 3) -> dict[Path, tuple[str, list]]:
    """What Predictor (as tools/predict.py) gives for each image file with its own task's run."""
    found = {}
    for task in TASKS:
        for path, answer in zip(images[task], Predictor.from_source(runs[task]).predict(images[task], top_k=top_k),
                                strict=True):
            found[path] = (task, list(zip(answer.labels, answer.probabilities, strict=True)))
    return found


def assert_same(answer: dict, task: str, expected: list) -> None:
    assert answer["task"] == task
    assert answer["label"] == expected[0][0]
    assert answer["probability"] == pytest.approx(expected[0][1], abs=1e-5)
    assert [label for label, _ in answer["top_k"]] == [label for label, _ in expected]
    assert [p for _, p in answer["top_k"]] == pytest.approx([p for _, p in expected], abs=1e-5)


def bad_requests() -> list[tuple[str, bytes, int, str]]:
    """(what, body, status, a piece of the message) for every kind of bad request."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 90, 200)).save(png, format="PNG")
    png = png.getvalue()
    big = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * (MAX_BYTES + 1000))  # tEXt is stored as is: an 8x8 image over the byte limit
    Image.new("RGB", (8, 8)).save(big, format="PNG", pnginfo=info)
    wide = io.BytesIO()
    Image.new("RGB", (40, 40)).save(wide, format="PNG")  # 1600 pixels, few bytes
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(noise, format="PNG")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    return [
        ("not JSON", b"{not json", 400, "not JSON"),
        ("not an object", b"[1, 2]", 400, "JSON object"),
        ("missing task", json.dumps({"image": base64.b64encode(png).decode()}).encode(), 400, "missing field 'task'"),
        ("missing image", json.dumps({"task": "novel"}).encode(), 400, "missing field 'image'"),
        ("unknown field", predict_body("novel", png, topk=2), 400, "unknown field"),
        ("bad base64", predict_body("novel", "@@not base64@@"), 400, "not valid base64"),
        ("not an image", predict_body("novel", b"hello, this is text"), 400, "not a PNG or JPEG"),
        ("a GIF", predict_body("novel", gif.getvalue()), 400, "not a PNG or JPEG"),
        ("truncated PNG", predict_body("novel", noise.getvalue()[:-800]), 400, "cannot be decoded"),
        ("top_k 0", predict_body("novel", png, top_k=0), 400, "[1, 5]"),
        ("top_k above the classes", predict_body("base", png, top_k=6), 400, "[1, 5]"),
        ("top_k a string", predict_body("base", png, top_k="2"), 400, "'top_k' must be an integer"),
        ("unknown task", predict_body("letters", png), 404, "unknown task 'letters'"),
        ("over the byte limit", predict_body("novel", big.getvalue()), 413, f"limit of {MAX_BYTES}"),
        ("over the pixel limit", predict_body("novel", wide.getvalue()), 413, f"limit of {MAX_PIXELS}"),
    ]


def test_the_server_answers_both_tasks_as_predictor_does_and_refuses_bad_requests(server, runs, images):
    url = server.url
    expected = expected_answers(runs, images)
    status, listing = call(f"{url}/tasks")
    assert status == 200
    assert listing["tasks"] == [{"name": "novel", "num_classes": 5, "labels": ["5", "6", "7", "8", "9"]},
                                {"name": "base", "num_classes": 5, "labels": ["0", "1", "2", "3", "4"]}]
    good = [(path, task, predict_body(task, path.read_bytes())) for path, (task, _) in expected.items()]
    bad = bad_requests()
    # Good and bad requests of both tasks interleaved from 4 threads: batches mix tasks, and a bad request
    # must not fail the good ones batched with it.
    bodies = [body for pair in zip(good, bad, strict=False) for body in (pair[0][2], pair[1][1])]
    bodies += [body for _, _, body in good[len(bad):]] + [body for _, body, _, _ in bad[len(good):]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = dict(zip(bodies, pool.map(lambda body: call(f"{url}/predict", body), bodies), strict=True))
    for path, task, body in good:
        status, answer = answers[body]
        assert status == 200, answer
        assert_same(answer, task, expected[path][1])
    for what, body, code, message in bad:
        status, answer = answers[body]
        assert (status, message in answer.get("detail", "")) == (code, True), (what, answer)
    # Still serving: health, and a request with its own top_k.
    assert call(f"{url}/health")[0] == 200
    path = images["base"][0]
    status, answer = call(f"{url}/predict", predict_body("base", path.read_bytes(), top_k=5))
    assert status == 200
    assert_same(answer, "base", expected_answers(runs, images, top_k=5)[path][1])


def test_requests_of_both_tasks_arriving_together_share_one_forward_pass(server, runs, images):
    """LitServe's dynamic batching puts requests of different tasks into one mixed-task forward pass."""
    expected = expected_answers(runs, images)
    burst = [(path, task, predict_body(task, path.read_bytes())) for path, (task, _) in expected.items()][:8]
    burst = [burst[i // 2 + (len(burst) // 2 if i % 2 else 0)] for i in range(len(burst))]  # tasks alternate
    before = len(server.batches())
    start = threading.Barrier(len(burst))

    def send(body: bytes):
        start.wait(timeout=REQUEST_SECONDS)
        return call(f"{server.url}/predict", body)

    with ThreadPoolExecutor(max_workers=len(burst)) as pool:
        answers = list(pool.map(send, [body for _, _, body in burst]))
    for (path, task, _), (status, answer) in zip(burst, answers, strict=True):
        assert status == 200, answer
        assert_same(answer, task, expected[path][1])
    batches = server.batches()[before:]
    assert sum(sum(batch.values()) for batch in batches) == len(burst)
    assert any(set(batch) == set(TASKS) for batch in batches), batches


def test_a_mixed_batch_in_process_gives_each_task_its_own_predictions(runs, images):
    specs = resolve_tasks([(task, str(runs[task])) for task in TASKS])
    model, served = build_tasks(specs)
    tasks = {task.name: task for task in served}
    expected = expected_answers(runs, images)
    order = [path for pair in zip(images["novel"], images["base"], strict=True) for path in pair]  # interleaved
    items = [(expected[path][0], tasks[expected[path][0]].transform()(Image.open(path).convert("RGB")), 3)
             for path in order]
    for path, answer in zip(order, classify_mixed(model, tasks, items), strict=True):
        assert_same(answer, *expected[path])


def test_tasks_of_different_bases_are_refused_naming_the_task(runs, tmp_path, capsys):
    other = timm.create_model("test_resnet", pretrained=False, num_classes=5)  # the hub's weights, not the bundled
    inject_lora(other, LoraConfig(r=2, targets=["conv"]))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(ServeError, match="task 'other' was trained on test_resnet with hub weights, but task 'novel'"):
        resolve_tasks([("novel", str(runs["novel"])), ("other", str(tmp_path / "other"))])
    assert TOOL.main(["--task", f"novel={runs['novel']}", "--task", f"other={tmp_path / 'other'}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: task 'other' ") and error.count("\n") == 1
    # Given the bundled weights, the same adapter folder shares the base.
    weights = f"local-dir:{ROOT / 'data' / 'weights' / 'resnet_digits'}"
    specs = resolve_tasks([("novel", str(runs["novel"])), ("other", str(tmp_path / "other"))], weights)
    assert [spec.base.identity() for spec in specs][0] == specs[1].base.identity()
