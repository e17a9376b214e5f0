"""tools/fewshot_benchmark.py and visionlora.benchmark: methods, protocols, exact baselines, statistics, resume."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool

import visionlora.benchmark.sweep as sweep_module
from visionlora.benchmark import (
    Backbone,
    Budget,
    CellData,
    ResultsLog,
    SweepConfig,
    draw_episode,
    kshot_cells,
    mean_ci,
    parse_method,
    run_cell,
    run_sweep,
)
from visionlora.benchmark.protocols import data_module, omniglot_cells
from visionlora.benchmark.results import SETTING_FIELDS, settings_hash
from visionlora.data import digits_split
from visionlora.lora import lora_layers

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "datasets" / "omniglot"
RESNET = Backbone("test_resnet", pretrained_file="local-dir:" + str(ROOT / "data" / "weights" / "resnet_digits"))
PREP = {"image_size": 24, "mean": (0.3,) * 3, "std": (0.4,) * 3, "crop_pct": 1.0, "crop_scale": (0.85, 1.0),
        "hflip": False}


def _digits_cell(shots: int = 2) -> CellData:
    images, labels, _ = digits_split("novel", "train")
    test_images, test_labels, _ = digits_split("novel", "test")
    chosen = np.concatenate([np.flatnonzero(labels == c)[:shots] for c in range(5)])
    return CellData(images[chosen], labels[chosen], test_images[:60], test_labels[:60], 5)


@pytest.mark.parametrize("name, method, rank, scope, dora", [
    ("ncm", "ncm", 0, "all", False), ("linear", "linear", 0, "all", False), ("full", "full", 0, "all", False),
    ("lora-r8", "lora", 8, "all", False), ("lora-attn-r4", "lora", 4, "attn", False),
    ("lora-all-r16", "lora", 16, "all", False), ("dora-r2", "lora", 2, "all", True)])
def test_parse_method(name, method, rank, scope, dora):
    spec = parse_method(name)
    assert (spec.method, spec.rank, spec.scope, spec.use_dora) == (method, rank, scope, dora)
    if method == "lora":
        config = spec.lora_config(is_vit=True)
        assert config.r == rank and config.alpha == rank and config.use_dora == dora
        assert config.targets == (["attn"] if scope == "attn" else ["vit-all"])
        assert spec.lora_config(is_vit=False).targets == ["conv"] if scope == "all" else True


def test_lorafa_is_lora_with_A_frozen_and_enters_the_settings_hash():
    from visionlora.benchmark.settings import method_settings

    spec = parse_method("lorafa-r4")
    config = spec.lora_config(is_vit=False)
    assert (spec.method, spec.rank, config.freeze_A, config.targets) == ("lora", 4, True, ["conv"])
    assert parse_method("lora-r4").lora_config(is_vit=False).freeze_A is False
    sweep = {field: "" for field in SETTING_FIELDS if field not in ("method_spec", "settings")}
    assert "freeze_A" not in method_settings(sweep, parse_method("lora-r4"))["method_spec"]
    assert '"freeze_A": true' in method_settings(sweep, spec)["method_spec"]


@pytest.mark.parametrize("bad", ["lora", "lora-r0", "lora-x-r4", "knn", "LoRA-r4"])
def test_unknown_method_names_the_choices(bad):
    with pytest.raises(ValueError, match="unknown method"):
        parse_method(bad)


def test_attention_only_lora_needs_attention():
    with pytest.raises(ValueError, match="attention"):
        parse_method("lora-attn-r4").lora_config(is_vit=False)


def test_episode_is_disjoint_balanced_and_seeded():
    labels = np.repeat(np.arange(8), 30)
    support, query, (support_labels, query_labels) = draw_episode(labels, ways=5, shots=3, queries=7, seed=4)
    assert len(support) == 15 and len(query) == 35 and not set(support) & set(query)
    assert np.bincount(support_labels).tolist() == [3] * 5 and np.bincount(query_labels).tolist() == [7] * 5
    # episode labels follow the original classes: same class, same episode label
    assert all(len({labels[i] for i in support[support_labels == c]}) == 1 for c in range(5))
    again = draw_episode(labels, ways=5, shots=3, queries=7, seed=4)
    assert np.array_equal(again[0], support) and np.array_equal(again[1], query)
    other = draw_episode(labels, ways=5, shots=1, queries=7, seed=4)
    assert set(labels[other[0]]) == set(labels[support])  # episode e keeps its classes at every k
    with pytest.raises(ValueError, match="class .* has 30 images"):
        draw_episode(labels, ways=5, shots=25, queries=7, seed=0)


def test_kshot_cells_draw_k_per_class_and_share_the_test_split():
    data = data_module("digits", None, "novel")
    cells = list(kshot_cells(data, shots=[1, 4], seeds=[0, 1]))
    assert [(key.shots, key.trial) for key, _ in cells] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    for key, cell in cells:
        assert np.bincount(cell.train_labels).tolist() == [key.shots] * 5
        assert np.array_equal(cell.test_labels, cells[0][1].test_labels)
    assert not np.array_equal(cells[2][1].train_images, cells[3][1].train_images)  # seeds differ


def test_mean_ci_is_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci([0.5])[1])


def test_ncm_cell_equals_nearest_class_mean_by_hand():
    data = _digits_cell()
    result = run_cell(parse_method("ncm"), RESNET, data, PREP, Budget(), seed=0)
    from visionlora.benchmark.cells import _eval, _loader, build_module

    module = build_module(parse_method("ncm"), RESNET, 5, Budget()).eval()

    def features(images):
        batch = torch.cat([x for x, _ in _loader(images, np.zeros(len(images), dtype=np.int64), _eval(PREP), 64)])
        with torch.no_grad():
            return module.model.forward_head(module.model.forward_features(batch), pre_logits=True)

    means = torch.stack([features(data.train_images)[torch.from_numpy(data.train_labels) == c].mean(0)
                         for c in range(5)])
    predicted = torch.cdist(features(data.test_images), means).argmin(1).numpy()
    assert result.accuracy == pytest.approx(float((predicted == data.test_labels).mean()))
    assert result.trainable_params == 5 * module.model.num_features + 5  # the imprinted head


def test_pixel_nearest_neighbour_by_hand():
    data = _digits_cell(shots=1)
    result = run_cell(parse_method("pixel-nn"), RESNET, data, PREP, Budget(), seed=0)
    from visionlora.benchmark.cells import _eval, _loader

    def pixels(images):
        return torch.cat([x for x, _ in _loader(images, np.zeros(len(images), dtype=np.int64), _eval(PREP), 64)])

    nearest = torch.cdist(pixels(data.test_images).flatten(1), pixels(data.train_images).flatten(1)).argmin(1)
    assert result.accuracy == pytest.approx(float((data.train_labels[nearest.numpy()] == data.test_labels).mean()))


def test_lora_cell_trains_only_lora_and_head(monkeypatch):
    captured = {}
    original = sweep_module.run_cell.__globals__["train_steps"]

    def spy(module, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        original(module, *args, **kwargs)
        captured.update(module=module, before=before)

    monkeypatch.setitem(sweep_module.run_cell.__globals__, "train_steps", spy)
    result = run_cell(parse_method("lora-r2"), RESNET, _digits_cell(), PREP, Budget(steps=4, batch_size=5), seed=0)
    module, before = captured["module"], captured["before"]
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n or n.startswith("fc.") for n in changed)
    lora = sum(p.numel() for layer in lora_layers(module.model).values()
               for n, p in layer.named_parameters() if "lora_" in n)
    assert result.trainable_params == lora + 5 * module.model.num_features + 5


def test_sweep_appends_resumes_and_reports(tmp_path, monkeypatch):
    config = SweepConfig.from_dict(dict(name="t", methods=["ncm", "lora-r1"], shots=[1, 2], seeds=[0], steps=2,
                                        out=str(tmp_path), pretrained_file=RESNET.pretrained_file))
    calls = []
    real = sweep_module.run_cell

    def interrupt_on_third(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", interrupt_on_third)
    run_sweep(config, progress=False)
    assert len(ResultsLog(tmp_path / "results.csv").rows) == 2  # the interrupted cell is not recorded
    calls.clear()
    summary = run_sweep(config, progress=False)
    assert len(calls) == 2 and len(ResultsLog(tmp_path / "results.csv").rows) == 4
    assert {(s["method"], int(s["shots"]), s["n"]) for s in summary} == {
        ("ncm", 1, 1), ("ncm", 2, 1), ("lora-r1", 1, 1), ("lora-r1", 2, 1)}
    for name in ("summary.md", "accuracy_vs_shots.png", "accuracy_vs_params.png"):
        assert (tmp_path / name).stat().st_size > 100
    calls.clear()
    run_sweep(config, progress=False)
    assert calls == []  # everything done: nothing reruns


def _settled(row: dict) -> dict:
    """``row`` with the settings columns every results row carries (placeholder values) and their hash."""
    settings = {field: row.get(field, "x") for field in SETTING_FIELDS}
    return row | settings | {"settings": settings_hash(settings)}


def test_results_log_ignores_a_cut_line_and_rejects_other_csv(tmp_path):
    log = ResultsLog(tmp_path / "r.csv")
    row = _settled(dict(protocol="kshot", dataset="d", backbone="b", method="ncm", ways=5, shots=1, trial=0,
                        accuracy=0.5, trainable_params=10, total_params=100, seconds=1.0))
    log.append(row)
    with (tmp_path / "r.csv").open("a") as handle:
        handle.write("kshot,d,b,ncm,5,1,1,0.")  # killed mid-write
    reopened = ResultsLog(tmp_path / "r.csv")
    assert len(reopened.rows) == 1 and reopened.done(row) and not reopened.done(row | {"trial": 1})
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a few-shot benchmark results file"):
        ResultsLog(tmp_path / "other.csv")


def test_cli_rejects_unknown_config_field(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: x\nshotz: [1]\n")
    assert load_tool("fewshot_benchmark").main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown field(s) ['shotz']" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "benchmark").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_benchmark_configs_parse(config):
    tool = load_tool("fewshot_benchmark")
    root = ["--root", str(OMNIGLOT)] if "protocol: omniglot" in config.read_text() else []  # shipped: no root
    args = tool.parse_args(["--config", str(config), *root])
    parsed = tool.load_config(args)
    assert parsed.methods and all(parse_method(m) for m in parsed.methods)


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="Omniglot archives not at ../shared/datasets/omniglot")
def test_omniglot_cells_are_the_20_official_runs():
    cells = list(omniglot_cells(str(OMNIGLOT)))
    assert [key.trial for key, _ in cells] == list(range(1, 21))
    for key, cell in cells:
        assert key.ways == 20 and key.shots == 1 and cell.num_classes == 20
        assert sorted(cell.train_labels.tolist()) == list(range(20)) and len(cell.test_labels) == 20


class _FakeFlowers:
    """Stands in for torchvision.datasets.Flowers102: the attributes torchvision_split reads, no download."""

    root = None

    def __init__(self, root, download, split):
        assert download is False
        count = 12 if split == "train" else 6
        self._image_files = [Path(_FakeFlowers.root) / f"{split}_{i}.png" for i in range(count)]
        self._labels = [i % 3 for i in range(count)]


def test_torchvision_fgvc_sets_run_through_the_kshot_protocol(tmp_path, monkeypatch):
    from PIL import Image

    import visionlora.data.sources.torchvision_sets as tv
    from visionlora.data import FewShotDataModule as TorchvisionDataModule  # the benchmark no longer subclasses it

    for split, count in (("train", 12), ("test", 6)):
        for i in range(count):
            Image.fromarray(np.full((20, 20, 3), 40 * (i % 3), dtype=np.uint8)).save(tmp_path / f"{split}_{i}.png")
    _FakeFlowers.root = tmp_path
    monkeypatch.setattr(tv.torchvision.datasets, "Flowers102", _FakeFlowers)
    data = data_module("torchvision:flowers102", str(tmp_path), "novel")
    assert isinstance(data, TorchvisionDataModule) and data.num_classes == 3 and data.class_names == ["0", "1", "2"]
    (key, cell), = kshot_cells(data, shots=[2], seeds=[0])
    assert np.bincount(cell.train_labels).tolist() == [2, 2, 2] and len(cell.test_labels) == 6
    result = run_cell(parse_method("pixel-nn"), RESNET, cell, PREP, Budget(), seed=0)
    assert result.accuracy == 1.0  # each class is one flat grey level: the nearest pixels are always right


def test_torchvision_set_missing_or_unknown_is_named(tmp_path):
    from visionlora.data.sources.torchvision_sets import torchvision_split

    with pytest.raises(FileNotFoundError, match="OxfordIIITPet not found under"):
        torchvision_split("pets", tmp_path, "train")
    with pytest.raises(ValueError, match="must be one of"):
        torchvision_split("imagenet", tmp_path, "train")


@pytest.mark.parametrize("name, method, pretrained, lr", [
    ("scratch", "full", False, 2e-3), ("full", "full", True, 5e-4), ("raw-nn", "raw-nn", True, 3e-3),
    ("pixel-nn", "pixel-nn", True, 3e-3)])
def test_parse_baseline_methods(name, method, pretrained, lr):
    spec = parse_method(name)
    assert (spec.method, spec.pretrained, spec.lr, spec.head_lr) == (method, pretrained, lr, 3e-3)
    assert spec.trains == (method == "full")


def test_raw_nn_cell_is_the_former_raw_pixel_1nn():
    """raw-nn equals raw_pixel_1nn of the removed benchmarks/fewshot_baselines.py (its formula, recomputed here)."""
    from visionlora.data import FewShotDataModule

    shots, seed = 1, 3
    (key, cell), = kshot_cells(data_module("digits", None, "novel"), shots=[shots], seeds=[seed])
    result = run_cell(parse_method("raw-nn"), RESNET, cell, PREP, Budget(), seed=seed)
    # the former script: 1-NN on channel 0 of the raw 8x8 images of FewShotDataModule's own k-shot draw
    data = FewShotDataModule(dataset="digits", classes="novel", shots=shots, seed=seed)
    data.setup("fit")
    train, test = data.raw_split("train"), data.raw_split("test")
    train_x = torch.as_tensor(np.stack(train.images)[..., 0], dtype=torch.float32).flatten(1)
    test_x = torch.as_tensor(np.stack(test.images)[..., 0], dtype=torch.float32).flatten(1)
    nearest = torch.cdist(test_x, train_x).argmin(dim=1)
    former = (torch.as_tensor(train.labels)[nearest] == torch.as_tensor(test.labels)).float().mean().item()
    assert result.accuracy == pytest.approx(former, abs=1e-7)  # float32 .item() of the same count
    assert round(result.accuracy * len(test.labels)) == round(former * len(test.labels))
    assert (result.trainable_params, result.total_params) == (0, 0)


def test_raw_nn_needs_one_stored_size():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    cell = CellData(images, np.array([0, 1]), [np.zeros((9, 8, 3), dtype=np.uint8)], np.array([0]), 2)
    with pytest.raises(ValueError, match=r"raw-nn: every image must be stored at one size .*\(9, 8, 3\)"):
        run_cell(parse_method("raw-nn"), RESNET, cell, PREP, Budget(), seed=0)


def test_scratch_builds_the_pretrained_architecture_with_random_weights():
    from visionlora.benchmark.cells import build_module

    scratch = build_module(parse_method("scratch"), RESNET, 5, Budget())
    pretrained = build_module(parse_method("full"), RESNET, 5, Budget())
    total = sum(p.numel() for p in scratch.parameters())
    assert scratch.trainable_parameter_count() == total == sum(p.numel() for p in pretrained.parameters())
    assert scratch.hparams.pretrained_file is None and scratch.hparams.backbone_lr == 2e-3
    reference = pretrained.model.state_dict()
    backbone = {n: t for n, t in scratch.model.state_dict().items() if not n.startswith("fc.")}
    assert backbone.keys() <= reference.keys()
    weights = [n for n in backbone if n.endswith(".weight") and backbone[n].ndim == 4]
    assert weights and not any(torch.equal(backbone[n], reference[n]) for n in weights)  # every conv re-drawn
    result = run_cell(parse_method("scratch"), RESNET, _digits_cell(), PREP, Budget(steps=2, batch_size=5), seed=0)
    assert result.trainable_params == result.total_params == total


def test_scratch_vit_takes_its_shape_from_the_local_dir_config():
    from visionlora.benchmark.cells import build_module, random_init_architecture

    vit = Backbone("vit_tiny_patch16_224", pretrained_file="local-dir:" + str(ROOT / "data" / "weights" / "vit_digits"))
    name, model_args = random_init_architecture(vit)
    assert name == "vit_tiny_patch16_224" and model_args["img_size"] == [24, 24] and model_args["depth"] == 4
    assert "num_classes" not in model_args
    scratch, pretrained = (build_module(parse_method(m), vit, 5, Budget()) for m in ("scratch", "full"))
    assert [(n, p.shape) for n, p in scratch.named_parameters()] == [
        (n, p.shape) for n, p in pretrained.named_parameters()]
    assert random_init_architecture(Backbone("test_resnet")) == ("test_resnet", None)


def test_digits_baselines_config_names_the_former_comparison():
    tool = load_tool("fewshot_benchmark")
    config = tool.load_config(tool.parse_args(["--config", str(ROOT / "configs/benchmark/digits_baselines.yaml")]))
    assert (config.name, config.protocol, config.dataset, config.classes) == ("digits_baselines", "kshot", "digits",
                                                                              "novel")
    assert config.pretrained_file == "local-dir:data/weights/resnet_digits" and config.backbone == "test_resnet"
    assert config.methods == ["raw-nn", "pixel-nn", "ncm", "linear", "full", "scratch", "lora-r2"]
    assert config.shots == [1, 5] and config.seeds == [0, 1, 2, 3, 4]
    lora = parse_method("lora-r2").lora_config(is_vit=False)
    assert (lora.r, lora.targets) == (2, ["conv"])  # configs/default.yaml's rank and targets
