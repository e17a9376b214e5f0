"""The imprinted (nearest-class-mean) head of LoraClassifier: exact values, NCM predictions, margin scaling, and
that it is built from visionlora.tasks.prototypes without changing a bit."""

import pytest
import torch

from visionlora.tasks import LoraClassifier
from visionlora.tasks.classification import prototype_scale
from visionlora.tasks.prototypes import class_means, pooled_features


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


def _former_imprint(module, batches, margin):
    """The head imprint_head set before it used prototypes.py: its own loop, kept here as the reference."""
    model, head = module.model, module.model.get_classifier()
    sums = head.weight.new_zeros(head.out_features, head.in_features, dtype=torch.float32)
    counts = sums.new_zeros(head.out_features)
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            features = model.forward_head(model.forward_features(images), pre_logits=True)
            sums.index_add_(0, labels, features.float())
            counts += torch.bincount(labels, minlength=head.out_features).float()
    seen = counts > 0
    means = sums[seen] / counts[seen, None]
    scale = prototype_scale(means, margin)
    return seen, scale * means, -0.5 * scale * means.pow(2).sum(dim=1)


@pytest.mark.parametrize("margin", [None, 4.0])
def test_imprinted_head_is_bit_identical_to_the_former_loop(margin):
    module = _classifier(margin)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(9, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 2, 2, 0, 1, 2, 0, 2, 2])  # class 1 once, three batches of uneven size
    batches = [(images[:4], labels[:4]), (images[4:5], labels[4:5]), (images[5:], labels[5:])]
    seen, weight, bias = _former_imprint(module, batches, margin)
    module.imprint_head(batches)
    head = module.model.get_classifier()
    assert seen.all() and torch.equal(head.weight, weight) and torch.equal(head.bias, bias)


def test_imprint_leaves_unseen_classes_and_the_mode_alone():
    module = _classifier(4.0).train()
    before = module.model.get_classifier().weight.detach().clone()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    module.imprint_head([(images, torch.tensor([0, 2, 0, 2]))])
    after = module.model.get_classifier().weight
    assert module.training and torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])


def test_imprinted_means_are_prototypes_euclidean_class_means():
    module = _classifier(None)
    images = torch.cat([b[0] for b in _batches()])
    labels = torch.cat([b[1] for b in _batches()])
    module.imprint_head([(images, labels)])  # one batch: the same sums class_means makes
    classes, means = class_means(pooled_features(module.model, images), labels, normalize=False)
    assert classes.tolist() == [0, 1, 2] and torch.equal(module.model.get_classifier().weight, means)
