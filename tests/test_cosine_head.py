"""The cosine head of LoraClassifier (``cosine_scale``): its logits, its prototype initialisation (the cosine
nearest class mean), the baked linear head exports use, and the benchmark's ``-cos`` methods."""

import pytest
import torch
import torch.nn.functional as F

from visionlora.benchmark.methods import COSINE_SCALE, parse_method
from visionlora.tasks import LoraClassifier
from visionlora.tasks.prototypes import nearest_class_mean


def _images():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def _cosine(scale=10.0, method="linear"):
    torch.manual_seed(0)
    return LoraClassifier("test_resnet", 4, model_args={}, method=method, cosine_scale=scale).eval()


def _features(module, images):
    with torch.no_grad():
        return module.model.forward_head(module.model.forward_features(images), pre_logits=True)


def test_cosine_logits_are_scale_times_cosine_similarity():
    module = _cosine(scale=7.0)
    images, _ = _images()
    weight = module.model.get_classifier().weight
    with torch.no_grad():
        expected = 7.0 * F.normalize(_features(module, images), dim=1) @ F.normalize(weight, dim=1).T
        logits = module(images)
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 7.0 + 1e-5


def test_prototype_init_makes_the_cosine_head_the_cosine_nearest_class_mean():
    module = _cosine()
    images, labels = _images()
    module.imprint_head([(images[:5], labels[:5]), (images[5:], labels[5:])])
    features = _features(module, images)
    means = torch.stack([F.normalize(features[labels == c], dim=1).mean(0) for c in range(4)])
    head = module.model.get_classifier()
    torch.testing.assert_close(head.weight, means, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(head.bias) == 0
    queries = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        predicted = module(queries).argmax(1)
    assert torch.equal(predicted, nearest_class_mean(features, labels, _features(module, queries)))


def test_the_baked_linear_head_predicts_what_the_cosine_head_does():
    module = _cosine(scale=16.0)
    images, _ = _images()
    with torch.no_grad():
        cosine = module(images)
    module.bake_cosine_head()
    head = module.model.get_classifier()
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((4,), 16.0))
    with torch.no_grad():
        plain = module.model(images)  # timm's own forward, as a bundled folder is used
    norms = _features(module, images).norm(dim=1, keepdim=True)
    torch.testing.assert_close(plain, cosine * norms, rtol=1e-4, atol=1e-4)
    assert torch.equal(plain.argmax(1), cosine.argmax(1))


def test_a_non_positive_scale_is_refused():
    with pytest.raises(ValueError, match="cosine_scale must be > 0"):
        LoraClassifier("test_resnet", 2, model_args={}, cosine_scale=0.0)


def test_cos_suffix_parses_onto_any_head_method():
    assert parse_method("lora-r2-cos").cosine_scale == COSINE_SCALE and parse_method("lora-r2-cos").rank == 2
    assert parse_method("ncm-cos16").cosine_scale == 16.0 and parse_method("ncm-cos16").method == "ncm"
    assert parse_method("linear-cos").lr == parse_method("linear").lr and parse_method("lora-r2").cosine_scale is None
    tuned = parse_method("lora-r2-cos-hlr1e-4-lr1e-3")
    assert (tuned.lr, tuned.head_lr, tuned.cosine_scale) == (1e-3, 1e-4, COSINE_SCALE)
    assert (parse_method("linear-lr0.02").lr, parse_method("linear-lr0.02").head_lr) == (0.02, 0.02)
    for bad in ("pixel-nn-cos", "scratch-cos", "lora-cos", "ncm-lr1e-3"):
        with pytest.raises(ValueError, match="unknown method|needs a method that trains"):
            parse_method(bad)


def test_the_cosine_margin_lowers_only_the_true_class_logit_in_the_training_loss():
    module = _cosine(scale=10.0)
    images, labels = _images()
    with torch.no_grad():
        logits = module(images)
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    module.hparams.cosine_margin = 0.25
    with torch.no_grad():
        loss = module.training_step((images, labels), 0)
    expected = F.cross_entropy(logits - 2.5 * F.one_hot(labels, 4), labels)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="cosine_margin needs a cosine head"):
        LoraClassifier("test_resnet", 2, model_args={}, cosine_margin=0.2)
