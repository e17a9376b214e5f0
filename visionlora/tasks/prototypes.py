"""Nearest class mean on a frozen backbone's pooled features: the class means behind both prototype classifiers.

The class mean of the support features is the prototype of prototypical networks (Snell, Swersky & Zemel 2017,
arXiv:1703.05175). Two classifiers use it:

- Euclidean: ``LoraClassifier.imprint_head`` (and with it the few-shot benchmark's ``ncm``) turns the means of the
  raw features into a linear head, w_c = μ_c, b_c = -½‖μ_c‖² (imprinted weights, Qi et al. 2018, arXiv:1712.07136),
  built from :func:`pooled_features` and :func:`add_class_sums` with ``normalize=False``.
- Cosine: :func:`nearest_class_mean` compares L2-normalised features with the means of L2-normalised support
  features, following SimpleShot (Wang et al. 2019, arXiv:1911.04623), where this alone makes a nearest-centroid
  classifier competitive. With one shot per class the class mean is the shot itself, so this is also cosine
  1-nearest-neighbour.

Torch only: no training, no data loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The pre-logits features of a timm model: ``forward_head(forward_features(x), pre_logits=True)``.

    The model is put in eval mode for the call (BatchNorm uses its running statistics, dropout is off) and restored
    to its previous mode afterwards.

    Args:
        model: A timm model (anything with ``forward_features`` and ``forward_head(..., pre_logits=True)``).
        images: ``[N, 3, H, W]`` float tensor, already normalised the way the model expects.
        batch_size: Images per forward pass (bounds the memory, not the result).

    Returns:
        ``[N, D]`` float32 features on ``images``' device.
    """
    if images.ndim != 4:
        raise ValueError(f"pooled_features: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"pooled_features: batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        chunks = [model.forward_head(model.forward_features(batch), pre_logits=True).float()
                  for batch in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def add_class_sums(sums: torch.Tensor, counts: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                   normalize: bool = True) -> None:
    """Add each feature row to its class's row of ``sums`` and 1 to its class's ``counts``, in place.

    The streaming half of :func:`class_means`, for features that come in batches: call it once per batch on the same
    ``sums`` and ``counts``, then divide.

    Args:
        sums: ``[C, D]`` float running sums; row ``c`` collects the features labelled ``c``.
        counts: ``[C]`` float running counts.
        features: ``[N, D]`` features.
        labels: ``[N]`` integer labels in ``0..C-1``.
        normalize: L2-normalise each feature before adding it (every shot then counts equally, whatever its norm;
            SimpleShot's cosine means); ``False`` sums the raw features (Euclidean means).
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"add_class_sums: features must be [N, D] with [N] labels, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if sums.shape[1:] != features.shape[1:] or counts.shape != sums.shape[:1]:
        raise ValueError(f"add_class_sums: sums [C, D] and counts [C] must match features [N, {features.shape[1]}], "
                         f"got {tuple(sums.shape)} and {tuple(counts.shape)}")
    features = F.normalize(features.float(), dim=1) if normalize else features.float()
    sums.index_add_(0, labels, features)
    counts += torch.bincount(labels, minlength=len(counts)).to(counts.dtype)


def class_means(support_feats: torch.Tensor, support_labels: torch.Tensor, normalize: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [C] sorted, means [C, D])`` of the support features of each class.

    With ``normalize`` (the default, what :func:`nearest_class_mean` uses) features are L2-normalised before
    averaging, so that every shot counts equally, whatever its feature norm; ``normalize=False`` averages the raw
    features (the Euclidean prototypes of an imprinted head).
    """
    if support_feats.ndim != 2 or support_labels.shape != support_feats.shape[:1]:
        raise ValueError(f"nearest_class_mean: support features must be [N, D] with [N] labels, got "
                         f"{tuple(support_feats.shape)} and {tuple(support_labels.shape)}")
    classes, index = torch.unique(support_labels, sorted=True, return_inverse=True)
    sums = support_feats.new_zeros(len(classes), support_feats.shape[1], dtype=torch.float32)
    counts = sums.new_zeros(len(classes))
    add_class_sums(sums, counts, support_feats, index, normalize)
    return classes, sums / counts[:, None]


def nearest_class_mean(support_feats: torch.Tensor, support_labels: torch.Tensor, query_feats: torch.Tensor
                       ) -> torch.Tensor:
    """Label of the class whose mean support feature is most cosine-similar to each query.

    Args:
        support_feats: ``[N, D]`` features of the labelled (support) images.
        support_labels: ``[N]`` integer labels; any values, not necessarily ``0..C-1``.
        query_feats: ``[Q, D]`` features to classify.

    Returns:
        ``[Q]`` int64 predicted labels, taken from ``support_labels``' values. Ties go to the smaller label.
    """
    if query_feats.ndim != 2 or query_feats.shape[1] != support_feats.shape[-1]:
        raise ValueError(f"nearest_class_mean: query features must be [Q, {support_feats.shape[-1]}], got "
                         f"{tuple(query_feats.shape)}")
    classes, means = class_means(support_feats, support_labels)
    similarity = F.normalize(query_feats.float(), dim=1) @ F.normalize(means, dim=1).T
    return classes[similarity.argmax(dim=1)].long()


def leave_one_out_prototype_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The prototypical loss of one batch: each image is classified by its squared Euclidean distance to the class
    means of the batch, its own class's mean taken without it (Snell, Swersky & Zemel 2017, arXiv:1703.05175).

    Every image is a query once, against prototypes from the rest of the batch, so a batch of P classes with K
    images each is P-way (K-1)-shot episodes for all its images at once; with K = 2 it is the one-shot task the
    Omniglot runs pose. Images alone in their class in the batch are not queries (their class has no other image
    to make a prototype from) but still serve as a prototype for the others.

    Args:
        features: ``[N, D]`` pooled features, with gradients.
        labels: ``[N]`` integer labels, any values.

    Returns:
        The mean cross-entropy over the queries, a scalar; 0 (with a gradient of zeros) when no class has two images.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"leave_one_out_prototype_loss: features must be [N, D] with [N] labels, got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    features = features.float()
    _, index = torch.unique(labels, return_inverse=True)
    sums = features.new_zeros(int(index.max()) + 1, features.shape[1])
    counts = sums.new_zeros(len(sums))
    add_class_sums(sums, counts, features, index, normalize=False)
    distances = torch.cdist(features, sums / counts[:, None]).square()
    own_count = counts[index]
    queries = own_count > 1
    if not queries.any():
        return features.sum() * 0.0
    # The own class's mean without the query: (sum - f) / (n - 1).
    own_mean = (sums[index] - features) / (own_count - 1).clamp(min=1)[:, None]
    own_distance = (features - own_mean).square().sum(dim=1)
    distances = distances.scatter(1, index[:, None], own_distance[:, None])
    return F.cross_entropy(-distances[queries], index[queries])
