"""Few-shot classification without training: nearest class mean on a frozen backbone's pooled features.

The class mean of the support features is the prototype of prototypical networks (Snell, Swersky & Zemel 2017,
arXiv:1703.05175); comparing L2-normalised features (cosine similarity) rather than raw Euclidean distance follows
SimpleShot (Wang et al. 2019, arXiv:1911.04623), where this alone makes a nearest-centroid classifier competitive.
With one shot per class the class mean is the shot itself, so this is also cosine 1-nearest-neighbour. Torch only:
no training, no data loading.
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


def class_means(support_feats: torch.Tensor, support_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [C] sorted, means [C, D])`` of the L2-normalised support features of each class.

    Features are normalised before averaging so that every shot counts equally, whatever its feature norm.
    """
    if support_feats.ndim != 2 or support_labels.shape != support_feats.shape[:1]:
        raise ValueError(f"nearest_class_mean: support features must be [N, D] with [N] labels, got "
                         f"{tuple(support_feats.shape)} and {tuple(support_labels.shape)}")
    classes, index = torch.unique(support_labels, sorted=True, return_inverse=True)
    normalised = F.normalize(support_feats.float(), dim=1)
    sums = normalised.new_zeros(len(classes), normalised.shape[1]).index_add_(0, index, normalised)
    counts = torch.bincount(index, minlength=len(classes)).to(sums.dtype)
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
