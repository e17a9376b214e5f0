"""The imprinted (nearest-class-mean) head of LoraClassifier: exact values, NCM predictions, margin scaling."""

import pytest
import torch

from visionlora.tasks import LoraClassifier
from visionlora.tasks.classification import prototype_scale


def _classifier(margin):
    torch.manual_seed(0)
    return LoraClassifier("test_resnet", 3, model_args={}, method="linear", prototype_margin=margin).eval()


def _batches():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=generator)
    return [(images[:4], torch.tensor([0, 1, 2, 0])), (images[4:], torch.tensor([1, 2]))]


@pytest.mark.parametrize("margin", [None, 4.0, 0.5])
def test_imprinted_head_is_the_scaled_class_mean_classifier(margin):
    module = _classifier(margin)
    module.imprint_head(_batches())
    images = torch.cat([b[0] for b in _batches()])
    labels = torch.cat([b[1] for b in _batches()])
    with torch.no_grad():
        features = module.model.forward_head(module.model.forward_features(images), pre_logits=True)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    pairwise = 0.5 * torch.cdist(means, means).pow(2).sum() / 6
    scale = 1.0 if margin is None else margin / pairwise
    head = module.model.get_classifier()
    torch.testing.assert_close(head.weight, scale * means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.bias, -0.5 * scale * means.pow(2).sum(1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = module(images)
    assert torch.equal(logits.argmax(1), torch.cdist(features, means).argmin(1))  # scaling keeps NCM predictions


def test_prototype_scale_reaches_the_margin():
    means = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # pairwise ½d²: 12.5, 50, 12.5 -> mean 25
    assert prototype_scale(means, 4.0) == pytest.approx(4.0 / 25.0)
    assert prototype_scale(means, None) == 1.0
    assert prototype_scale(means[:1], 4.0) == 1.0  # one class seen: nothing to calibrate against
