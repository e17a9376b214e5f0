"""The benchmark's ``-ncc`` methods: the nearest-centroid loss of task-specific adapters (Li, Liu & Bilen 2022) on
two views of the support set, and the cosine nearest class mean of the adapted features that then classifies."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionlora.benchmark.cells as cells
from visionlora.benchmark import Backbone, Budget, CellData, parse_method, run_cell
from visionlora.benchmark.results import SETTING_FIELDS
from visionlora.benchmark.settings import method_settings
from visionlora.data import digits_split
from visionlora.lora import lora_layers

PREP = {"image_size": 24, "mean": (0.3,) * 3, "std": (0.4,) * 3, "crop_pct": 1.0, "crop_scale": (0.85, 1.0),
        "hflip": False}
RESNET = Backbone("test_resnet")


class _Identity(nn.Module):
    """A stand-in timm model whose pre-logits features are its flattened input."""

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.flatten(1)


@pytest.mark.parametrize("name, method, scale, lr", [
    ("lora-r2-ncc", "lora", 10.0, 3e-3), ("lora-r2-cos16-ncc", "lora", 16.0, 3e-3),
    ("lora-r4-ncc-lr1e-3", "lora", 10.0, 1e-3), ("full-ncc", "full", 10.0, 5e-4)])
def test_ncc_suffix_parses_onto_feature_adapting_methods(name, method, scale, lr):
    spec = parse_method(name)
    assert (spec.method, spec.objective, spec.cosine_scale, spec.lr) == (method, "ncc", scale, lr)


@pytest.mark.parametrize("bad", ["linear-ncc", "ncm-ncc", "scratch-ncc", "pixel-nn-ncc"])
def test_ncc_needs_a_method_that_adapts_the_features(bad):
    with pytest.raises(ValueError, match="-ncc needs a LoRA/DoRA method or full"):
        parse_method(bad)


def test_the_objective_enters_the_settings_hash_only_when_it_is_not_cross_entropy():
    plain, ncc = parse_method("lora-r2-cos"), parse_method("lora-r2-cos-ncc")
    sweep = {field: "" for field in SETTING_FIELDS if field not in ("method_spec", "settings")}
    plain_settings, ncc_settings = method_settings(sweep, plain), method_settings(sweep, ncc)
    assert "objective" not in plain_settings["method_spec"] and '"objective": "ncc"' in ncc_settings["method_spec"]
    assert plain_settings["settings"] != ncc_settings["settings"]


def test_ncc_loss_is_cross_entropy_of_cosine_centroids_of_the_other_view_both_ways():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    labels = torch.tensor([7, 3, 7, 9, 3])  # classes 3, 7, 9: 0, 1, 2 in sorted order
    loss = cells.ncc_loss(_Identity(), first, second, labels, scale=4.0)

    def by_hand(keys, queries):
        total = 0.0
        for query, label in zip(queries, labels.tolist(), strict=True):
            centroids = [F.normalize(sum(F.normalize(k, dim=0) for k, c in zip(keys, labels.tolist(), strict=True)
                                         if c == cls), dim=0) for cls in (3, 7, 9)]
            logits = torch.stack([4.0 * F.normalize(query, dim=0) @ c for c in centroids])
            total += -torch.log_softmax(logits, 0)[(3, 7, 9).index(label)]
        return total / len(labels)

    expected = (by_hand(first, second) + by_hand(second, first)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ncc_loss_falls_as_the_views_of_a_class_agree():
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(4, 8, generator=generator)
    labels = torch.arange(4)
    noisy = cells.ncc_loss(_Identity(), first, torch.randn(4, 8, generator=generator), labels, scale=10.0)
    agreeing = cells.ncc_loss(_Identity(), first, first, labels, scale=10.0)
    assert agreeing.item() < noisy.item()


def _one_shot_digits() -> CellData:
    images, labels, _ = digits_split("novel", "train")
    test_images, test_labels, _ = digits_split("novel", "test")
    chosen = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(5)])
    return CellData(images[chosen], labels[chosen], test_images[:40], test_labels[:40], 5)


def test_an_ncc_cell_trains_only_lora_and_classifies_by_the_adapted_cosine_class_means(monkeypatch):
    kept = {}
    real_test_accuracy = cells.test_accuracy

    def keep_module(module, loader):
        kept["module"], kept["loader"] = module, loader
        return real_test_accuracy(module, loader)

    monkeypatch.setattr(cells, "test_accuracy", keep_module)
    data = _one_shot_digits()
    result = run_cell(parse_method("lora-r2-ncc"), RESNET, data, PREP, Budget(steps=3, batch_size=5), seed=0)
    module = kept["module"].eval()
    layer = next(iter(lora_layers(module.model).values()))
    assert layer.lora_B.abs().sum() > 0  # the adapter moved (B starts at zero)
    support = torch.cat([x for x, _ in cells._loader(data.train_images, data.train_labels, cells._eval(PREP), 64)])
    with torch.no_grad():
        features = module.model.forward_head(module.model.forward_features(support), pre_logits=True)
        queries = torch.cat([x for x, _ in kept["loader"]])
        query_features = module.model.forward_head(module.model.forward_features(queries), pre_logits=True)
    # One shot per class: each class mean is the adapted feature of its shot, and the head is their cosine NCM.
    centroids = F.normalize(features, dim=1)[np.argsort(data.train_labels)]
    predicted = (F.normalize(query_features, dim=1) @ centroids.T).argmax(1).numpy()
    assert result.accuracy == pytest.approx(float((predicted == data.test_labels).mean()))
    torch.testing.assert_close(F.normalize(module.model.get_classifier().weight, dim=1), centroids)
