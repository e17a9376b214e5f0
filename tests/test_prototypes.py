"""Nearest class mean (cosine) and pooled features, on handcrafted features and a tiny timm model."""

import pytest
import timm
import torch

from visionlora.tasks.prototypes import add_class_sums, class_means, nearest_class_mean, pooled_features


def test_nearest_class_mean_on_handcrafted_features():
    # Class 7 points along x, class 3 along y; the length of a vector must not matter (cosine).
    support = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 2.0], [0.5, 5.0]])
    labels = torch.tensor([7, 7, 3, 3])
    queries = torch.tensor([[100.0, 1.0], [0.1, 3.0], [1.0, 1.2], [2.0, 1.0]])
    assert nearest_class_mean(support, labels, queries).tolist() == [7, 3, 3, 7]


def test_class_means_average_unit_vectors():
    support = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, -2.0]])
    classes, means = class_means(support, torch.tensor([5, 5, 1]))
    assert classes.tolist() == [1, 5]
    assert torch.allclose(means, torch.tensor([[0.0, -1.0], [0.5, 0.5]]))
    classes, raw = class_means(support, torch.tensor([5, 5, 1]), normalize=False)  # Euclidean: plain averages
    assert classes.tolist() == [1, 5] and torch.equal(raw, torch.tensor([[0.0, -2.0], [1.5, 2.0]]))


def test_add_class_sums_streams_batches_into_the_same_sums():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    sums, counts = torch.zeros(3, 2), torch.zeros(3)
    add_class_sums(sums, counts, features[:2], torch.tensor([2, 0]), normalize=False)
    add_class_sums(sums, counts, features[2:], torch.tensor([2]), normalize=False)
    assert torch.equal(sums, torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]))
    assert counts.tolist() == [1.0, 0.0, 2.0]
    add_class_sums(sums, counts, torch.tensor([[0.0, 5.0]]), torch.tensor([1]))  # normalised: a unit vector
    assert sums[1].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"sums \[C, D\] and counts \[C\]"):
        add_class_sums(torch.zeros(3, 4), torch.zeros(3), features, torch.tensor([0, 1, 2]))


def test_one_shot_ncm_is_cosine_one_nearest_neighbour():
    generator = torch.Generator().manual_seed(0)
    support, queries = torch.randn(20, 16, generator=generator), torch.randn(50, 16, generator=generator)
    cosine = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(support, dim=1).T
    predicted = nearest_class_mean(support, torch.arange(20), queries)
    assert torch.equal(predicted, cosine.argmax(dim=1))


def test_nearest_class_mean_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"query features must be \[Q, 4\]"):
        nearest_class_mean(torch.zeros(3, 4), torch.arange(3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="support features must be"):
        nearest_class_mean(torch.zeros(3, 4), torch.arange(2), torch.zeros(2, 4))


def test_pooled_features_shape_batches_and_mode():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).train()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    features = pooled_features(model, images, batch_size=2)
    assert features.shape == (5, model.num_features) and features.dtype == torch.float32
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(features, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        pooled_features(model, images[0])
