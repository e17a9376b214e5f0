"""The omniglot-validation protocol of the few-shot benchmark, on generated background archives: its cells, its
keys, and a tiny sweep whose nearest-class-mean errors match the classifier computed here."""

import numpy as np
import pytest
import timm
import torch
from data.sources.test_omniglot_validation import write_background

from visionlora.benchmark import SweepConfig, run_sweep
from visionlora.benchmark.protocols import EPISODES_PER_SEED, omniglot_validation_cells, runs_preprocessing
from visionlora.data import eval_transform_from
from visionlora.data.sources.omniglot_episodes import omniglot_validation_episodes
from visionlora.tasks.prototypes import nearest_class_mean, pooled_features

from .conftest import ROOT

RESNET_OMNIGLOT = "local-dir:" + str(ROOT / "data" / "weights" / "resnet_omniglot")


def test_cells_are_the_episodes_of_each_seed_with_distinct_keys(tmp_path):
    root = write_background(tmp_path)
    cells = list(omniglot_validation_cells(str(root), episodes=3, seeds=[0, 2]))
    assert [key.trial for key, _ in cells] == [0, 1, 2, 2 * EPISODES_PER_SEED, 2 * EPISODES_PER_SEED + 1,
                                               2 * EPISODES_PER_SEED + 2]
    episodes = omniglot_validation_episodes(root, episodes=3, seed=2)
    for (key, cell), episode in zip(cells[3:], episodes, strict=True):
        assert key.ways == 20 and key.shots == 1 and cell.num_classes == 20
        assert np.array_equal(cell.train_images, episode.train_images)
        assert np.array_equal(cell.test_labels, episode.test_labels)


def test_a_validation_sweep_reports_error_rates_and_no_references(tmp_path):
    root = write_background(tmp_path / "data")
    config = SweepConfig.from_dict(dict(name="val", protocol="omniglot-validation", root=str(root), episodes=2,
                                        seeds=[0], methods=["ncm", "ncm-cos"], pretrained_file=RESNET_OMNIGLOT,
                                        out=str(tmp_path / "out"), threads=1))
    summary = {row["method"]: row for row in run_sweep(config, progress=False)}
    assert set(summary) == {"ncm", "ncm-cos"} and all(row["n"] == 2 for row in summary.values())
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "1-shot error %" in text and "validation episodes" in text and "Siamese" not in text
    assert (tmp_path / "out" / "error_vs_references.png").is_file()
    assert summary["ncm-cos"]["accuracy"] == np.mean(_cosine_ncm_accuracies(root, 2))


def _cosine_ncm_accuracies(root, episodes: int) -> list[float]:
    """The cosine nearest class mean of resnet_omniglot's pooled features on each episode, computed directly."""
    model = timm.create_model(RESNET_OMNIGLOT, pretrained=True).eval()
    transform = eval_transform_from(runs_preprocessing(timm.data.resolve_model_data_config(model)))
    accuracies = []
    for episode in omniglot_validation_episodes(root, episodes, seed=0):
        support, query = (pooled_features(model, torch.stack([transform(image=i)["image"] for i in images]))
                          for images in (episode.train_images, episode.test_images))
        predicted = nearest_class_mean(support, torch.as_tensor(episode.train_labels), query)
        accuracies.append(float(np.mean(predicted.numpy() == episode.test_labels)))
    return accuracies


def test_the_render_field_chooses_the_centred_render_and_is_recorded(tmp_path):
    root = write_background(tmp_path)
    (_, cell), = omniglot_validation_cells(str(root), episodes=1, seeds=[0], render="centred56")
    (_, small), = omniglot_validation_cells(str(root), episodes=1, seeds=[0])
    assert cell.train_images.shape == (20, 56, 56, 3) and small.train_images.shape == (20, 28, 28, 3)
    base = dict(name="val", protocol="omniglot-validation", root=str(root), episodes=1, methods=["ncm"],
                pretrained_file=RESNET_OMNIGLOT)
    assert SweepConfig.from_dict(base | {"render": "centred56"}).render == "centred56"
    with pytest.raises(ValueError, match="render must be one of"):
        SweepConfig.from_dict(base | {"render": "digits"})
    with pytest.raises(ValueError, match="render is not used by protocol 'kshot'"):
        SweepConfig.from_dict(dict(name="k", protocol="kshot", methods=["ncm"], render="centred56"))
