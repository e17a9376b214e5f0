"""The prototypical pretraining objective: the leave-one-out prototype loss, its class-balanced batches and
``LoraClassifier(prototype_loss=...)`` adding it to the cross-entropy."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionlora.data import FewShotDataModule
from visionlora.data.classification.balanced import ClassBalancedBatchSampler
from visionlora.tasks import LoraClassifier
from visionlora.tasks.prototypes import leave_one_out_prototype_loss

LABELS = torch.tensor([3, 3, 3, 7, 7, 1, 1, 1, 1, 9, 2, 2])  # class 9 has one image: not a query


def _loop_loss(features, labels):
    """The loss written out query by query: distances to every class mean, the query left out of its own."""
    classes = sorted(set(labels.tolist()))
    losses = []
    for i in range(len(labels)):
        if (labels == labels[i]).sum() < 2:
            continue
        distances = []
        for c in classes:
            members = labels == c
            members[i] = False
            distances.append(((features[i] - features[members].mean(0)) ** 2).sum())
        target = torch.tensor([classes.index(int(labels[i]))])
        losses.append(F.cross_entropy(-torch.stack(distances)[None], target))
    return torch.stack(losses).mean()


def test_the_loss_equals_the_query_by_query_definition_in_value_and_gradient():
    features = torch.randn(len(LABELS), 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = leave_one_out_prototype_loss(features, LABELS)
    (grad,) = torch.autograd.grad(loss, features)
    expected = _loop_loss(features, LABELS)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[9].abs().sum() > 0  # the lone image is still a prototype for the others


def test_the_loss_is_zero_without_a_class_of_two_and_refuses_bad_shapes():
    features = torch.randn(3, 4, requires_grad=True)
    loss = leave_one_out_prototype_loss(features, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"features must be \[N, D\] with \[N\] labels"):
        leave_one_out_prototype_loss(torch.randn(3, 4), torch.tensor([0, 1]))


def test_a_pair_of_well_separated_classes_has_a_near_zero_loss():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]])
    assert leave_one_out_prototype_loss(features, torch.tensor([0, 0, 1, 1])).item() < 1e-6


def _labels(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("per_class", [2, 3])
def test_batches_hold_groups_of_one_class_and_an_epoch_uses_each_image_at_most_once(per_class):
    labels = _labels([7, 9, 4, 12, 5])
    sampler = ClassBalancedBatchSampler(labels, 4 * per_class, per_class, torch.Generator().manual_seed(0))
    batches = list(sampler)
    groups = sum(n // per_class for n in [7, 9, 4, 12, 5])
    assert len(batches) == len(sampler) == groups // 4
    for batch in batches:
        assert len(batch) == 4 * per_class
        for start in range(0, len(batch), per_class):
            assert len(set(labels[batch[start:start + per_class]])) == 1
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))


def test_the_generator_alone_fixes_the_batches():
    labels = _labels([6] * 5)

    def batches(seed, epochs=2):
        sampler = ClassBalancedBatchSampler(labels, 6, 2, torch.Generator().manual_seed(seed))
        return [list(sampler) for _ in range(epochs)]

    first, second = batches(0)
    assert batches(0) == [first, second]
    assert first != second  # each epoch draws anew
    assert batches(1)[0] != first


def test_the_sampler_refuses_what_cannot_make_a_batch():
    generator = torch.Generator()
    with pytest.raises(ValueError, match="per_class must be >= 2"):
        ClassBalancedBatchSampler([0, 0], 2, 1, generator)
    with pytest.raises(ValueError, match="batch_size 5 must be a positive multiple of per_class 2"):
        ClassBalancedBatchSampler([0, 0], 5, 2, generator)
    with pytest.raises(ValueError, match="3 images in 2 classes make 1 groups of 2, fewer than the 2"):
        ClassBalancedBatchSampler([0, 0, 1], 4, 2, generator)


def test_the_data_module_serves_class_balanced_batches_and_checks_the_setting():
    data = FewShotDataModule("digits", shots=4, batch_size=10, per_class_in_batch=2, image_size=32)
    data.setup()
    batches = list(data.train_dataloader())
    assert len(batches) == 2  # 5 classes x 4 shots = 10 pairs, 5 pairs a batch
    for _, labels in batches:
        assert len(labels) == 10
        assert all(count % 2 == 0 for count in torch.bincount(labels).tolist())
    with pytest.raises(ValueError, match="per_class_in_batch must be >= 2 and divide batch_size 10, got 3"):
        FewShotDataModule("digits", shots=4, batch_size=10, per_class_in_batch=3)


def test_the_training_loss_is_cross_entropy_plus_the_weighted_prototype_loss():
    torch.manual_seed(0)
    module = LoraClassifier("test_resnet", 4, model_args={}, method="full", prototype_loss=0.5).eval()
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        loss = module.training_step((images, labels), 0)
        features = module.model.forward_head(module.model.forward_features(images), pre_logits=True)
        expected = F.cross_entropy(module(images), labels) + 0.5 * _loop_loss(features, labels)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="prototype_loss must be >= 0"):
        LoraClassifier("test_resnet", 2, model_args={}, prototype_loss=-1.0)


def test_class_balanced_batches_refuse_more_than_one_process():
    """Every rank would draw the same batches from the same seed (and Lightning cannot shard a batch sampler that
    is not a BatchSampler): a clear error before training instead of silently repeated data."""
    data = FewShotDataModule("digits", shots=4, batch_size=10, per_class_in_batch=2, image_size=32)
    data.setup()
    data.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"per_class_in_batch=2 .* single process, but the trainer runs 2"):
        data.train_dataloader()
    data.trainer = SimpleNamespace(world_size=1)
    assert len(data.train_dataloader()) == 2
