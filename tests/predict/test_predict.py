"""tools/predict.py and visionlora.Predictor: the same predictions from a run, its merged export and base + adapter,
reproducing the run's test metrics; COCO results for detectors; one-line errors for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from visionlora.cli import main as train_main
from visionlora.data import digits_split, generate_scenes
from visionlora.predict import Predictor

ROOT = Path(__file__).resolve().parents[2]
TOOL = load_tool("predict")
EXPORT = load_tool("export_merged")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """Three epochs of the default task (bundled ConvNet, LoRA in every conv, 5 shots of digits 5-9)."""
    runs = tmp_path_factory.mktemp("runs")
    train_main(["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.max_epochs", "3", *QUIET,
                "--runs_dir", str(runs), "--run_name", "digits"])
    (path,) = sorted((runs / "digits").iterdir())
    return path


@pytest.fixture(scope="module")
def digits_test_folder(tmp_path_factory) -> Path:
    """The default task's test split as PNG files in an ImageFolder (lossless: the same pixels as in memory)."""
    root = tmp_path_factory.mktemp("digits_test")
    images, labels, names = digits_split("novel", "test")
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / names[label]).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{index:04d}.png")
    return root


def predictions(folder: Path) -> list[list[str]]:
    with open(folder / "predictions.csv", newline="") as handle:
        return [row[1:] for row in csv.reader(handle)]  # without the path column


def test_run_export_and_adapter_agree_and_reproduce_the_test_accuracy(digits_run, digits_test_folder, tmp_path):
    assert TOOL.main([str(digits_run), str(digits_test_folder), "--out", str(tmp_path / "run")]) == 0
    assert EXPORT.main([str(digits_run), "--out", str(tmp_path / "merged")]) == 0
    assert TOOL.main([str(tmp_path / "merged"), str(digits_test_folder), "--out", str(tmp_path / "export")]) == 0
    assert TOOL.main(["--base", "test_resnet", "--pretrained-file", "local-dir:data/weights/resnet_digits",
                      "--adapter", str(digits_run / "adapter"), str(digits_test_folder),
                      "--out", str(tmp_path / "adapter")]) == 0
    from_run = predictions(tmp_path / "run")
    assert from_run[0][:4] == ["label", "probability", "top2_label", "top2_probability"]
    assert predictions(tmp_path / "export") == from_run
    # The adapter folder carries no label names: class indices instead, same order and probabilities.
    names = ["5", "6", "7", "8", "9"]
    by_index = [[names[int(v)] if i % 2 == 0 else v for i, v in enumerate(row)] for row in
                predictions(tmp_path / "adapter")[1:]]
    assert by_index == from_run[1:]
    results = json.loads((digits_run / "results.json").read_text())
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["images"] == 449
    assert metrics["correct"] == round(results["test acc"] * 449)
    assert metrics["macro_f1"] == pytest.approx(results["test macro-F1"], abs=1e-6)
    assert (tmp_path / "run" / "contact_sheet.png").is_file() and (tmp_path / "run" / "confusion_matrix.png").is_file()


def test_the_python_api_labels_arrays_paths_and_pil_images(digits_run, digits_test_folder):
    predictor = Predictor.from_source(digits_run)
    assert predictor.task == "classification" and predictor.class_names == ["5", "6", "7", "8", "9"]
    path = sorted((digits_test_folder / "7").iterdir())[0]
    array = np.asarray(Image.open(path).convert("RGB"))
    found = predictor.predict([path, array, Image.open(path)], top_k=2)
    assert len({(f.label, round(f.probability, 6)) for f in found}) == 1
    assert found[0].labels[0] in predictor.class_names and found[0].probabilities[0] >= found[0].probabilities[1]
    assert sum(found[0].probabilities) <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> tuple[Path, Path]:
    """A two-epoch LoRA FCOS run from the bundled base detector on tiny COCO-format scenes, with its test split."""
    scenes = tmp_path_factory.mktemp("scenes")
    for split, count in {"train": 12, "test": 6}.items():
        generate_scenes(scenes, count, image_size=64, seed=0, split=split)
    runs = tmp_path_factory.mktemp("runs")
    train_main(["--config", str(ROOT / "configs" / "detection" / "default.yaml"), "--data.dataset", "coco",
                "--data.root", str(scenes), "--data.image_size", "64", "--data.shots", "2", "--data.batch_size", "4",
                "--model.min_size", "64", "--model.max_size", "64", "--model.fpn_channels", "64",
                "--model.lr", "0.01", "--trainer.max_epochs", "2", *QUIET, "--runs_dir", str(runs),
                "--run_name", "det"])
    (path,) = sorted((runs / "det").iterdir())
    return path, scenes / "test"


def test_detections_reproduce_the_test_map_and_load_as_coco_results(detection_run, tmp_path):
    from pycocotools.coco import COCO

    run, test = detection_run
    out = tmp_path / "det"
    assert TOOL.main([str(run), str(test / "images"), "--annotations", str(test / "annotations.json"),
                      "--score-threshold", "0.01", "--out", str(out)]) == 0
    results = json.loads((run / "results.json").read_text())
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["map"] == pytest.approx(results["test mAP"], abs=1e-5)
    assert metrics["map_50"] == pytest.approx(results["mAP@50"], abs=1e-5)
    truth = COCO(str(test / "annotations.json"))
    found = truth.loadRes(str(out / "predictions.json"))
    rows = json.loads((out / "predictions.json").read_text())
    assert len(found.anns) == len(rows) > 0
    assert {row["image_id"] for row in rows} <= set(truth.getImgIds())
    assert {row["category_id"] for row in rows} <= set(truth.getCatIds())
    assert min(row["score"] for row in rows) >= 0.01
    assert len(list((out / "images").iterdir())) == 6


@pytest.mark.parametrize("case", ["not-a-source", "top-k-on-detector", "annotations-on-classifier",
                                  "adapter-of-other-architecture", "top-k-above-classes", "existing-output",
                                  "missing-input"])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(case, digits_run, detection_run,
                                                               digits_test_folder, tmp_path, capsys):
    out = tmp_path / "out"
    images = str(digits_test_folder)
    argv = {
        "not-a-source": [str(tmp_path), images],
        "top-k-on-detector": [str(detection_run[0]), str(detection_run[1] / "images"), "--top-k", "2"],
        "annotations-on-classifier": [str(digits_run), images, "--annotations", "x.json"],
        "adapter-of-other-architecture": ["--base", "test_vit", "--adapter", str(digits_run / "adapter"), images],
        "top-k-above-classes": [str(digits_run), images, "--top-k", "6"],
        "existing-output": [str(digits_run), images],
        "missing-input": [str(digits_run), str(tmp_path / "nowhere")],
    }[case]
    if case == "existing-output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert TOOL.main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    if case == "existing-output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
