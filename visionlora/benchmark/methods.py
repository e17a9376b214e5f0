"""The methods a few-shot benchmark compares, named by short strings (``ncm``, ``linear``, ``lora-attn-r4``, ...).

Each name maps to a :class:`MethodSpec`: which weights train (LoRA per Hu et al. 2021, arXiv:2106.09685; DoRA per
Liu et al. 2024, arXiv:2402.09353), at which learning rates, and for how many steps. Learning rates were tuned per
method on the default task (configs/default.yaml, digits 5-9), as a fair comparison needs; the baselines beside
them are in configs/benchmark/digits_baselines.yaml.

The two no-learning baselines differ in what they compare: ``raw-nn`` is 1-nearest-neighbour (Euclidean) on the
images as stored (raw uint8 pixels: no resize, no normalisation; for the Omniglot runs the native 105x105 images,
not the centred render the backbones see), ``pixel-nn`` on the model input (the images after the eval transform:
resized and centre-cropped to the backbone's input size, mean/std-normalised).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from visionlora.lora import LoraConfig

# Targets per scope; "all" adapts what the family preset adapts: every linear layer of a ViT block, or every conv.
SCOPES = {"attn": ["attn"], "all-vit": ["vit-all"], "all-conv": ["conv"]}
METHOD_PATTERN = re.compile(r"(?P<kind>lora|dora|lorafa)(-(?P<scope>attn|all))?-r(?P<rank>\d+)")
# "<method>-cos" or "<method>-cos<scale>": the same method with a prototype-initialised cosine head.
COSINE_PATTERN = re.compile(r"(?P<base>.+)-cos(?P<scale>\d+)?")
COSINE_SCALE = 10.0  # the default temperature of a "-cos" head
# "<method>-lr<rate>" / "-hlr<rate>" (last): the method at another learning rate of its trained weights (LoRA
# factors, backbone) or of its head, e.g. lora-r2-cos-hlr1e-4.
LR_PATTERN = re.compile(r"(?P<base>.+)-(?P<which>h?lr)(?P<lr>\d+(\.\d+)?(e-?\d+)?)")
# "<method>-ncc": the same method trained by the nearest-centroid loss between augmented views of the support set
# instead of cross-entropy through a head (see cells.ncc_loss).
NCC_PATTERN = re.compile(r"(?P<base>.+)-ncc")
NAMED = ("ncm", "linear", "full", "scratch", "pixel-nn", "raw-nn")
NEAREST_NEIGHBOUR = ("pixel-nn", "raw-nn")


@dataclass(frozen=True)
class MethodSpec:
    """How one method fine-tunes a backbone.

    Attributes:
        name: The string it was parsed from (shown in tables).
        method: ``LoraClassifier``'s ``method``: ``lora``, ``full`` or ``linear``; or ``ncm`` (the imprinted
            nearest-class-mean head, never stepped), ``pixel-nn`` (1-NN on the eval-transformed, normalised model
            input) or ``raw-nn`` (1-NN on the raw stored pixels), which take no gradient steps.
        rank: LoRA rank (LoRA/DoRA only).
        scope: ``attn`` (attention projections only) or ``all`` (every layer the family preset adapts).
        use_dora: Weight-decomposed LoRA.
        freeze_A: LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A a seeded frozen projection, only B trains.
        lr: Learning rate of the LoRA factors or, for ``full``, of the backbone.
        head_lr: Learning rate of the classifier head.
        pretrained: Start from the backbone's pretrained weights; ``False`` (``scratch``) builds the same
            architecture from random initialisation.
        cosine_scale: A cosine head of this scale (``LoraClassifier``'s ``cosine_scale``), initialised to the
            cosine class means: the method starts at the cosine nearest-class-mean classifier. None: linear head.
        objective: ``ce`` (cross-entropy through the head) or ``ncc``: the nearest-centroid loss of task-specific
            adapters (Li, Liu & Bilen 2022, arXiv:2107.00358) on two augmented views of the support set, after
            which the head is imprinted again from the adapted features (a cosine nearest class mean).
    """

    name: str
    method: str
    rank: int = 0
    scope: str = "all"
    use_dora: bool = False
    freeze_A: bool = False
    lr: float = 3e-3
    head_lr: float = 3e-3
    pretrained: bool = True
    cosine_scale: float | None = None
    objective: str = "ce"

    @property
    def trains(self) -> bool:
        """Whether the method takes gradient steps (NCM and the pixel nearest neighbours do not)."""
        return self.method in ("lora", "full", "linear")

    def lora_config(self, is_vit: bool) -> LoraConfig | None:
        """The LoRA settings for a ViT (``is_vit``) or a ConvNet backbone; None for non-LoRA methods."""
        if self.method != "lora":
            return None
        if self.scope == "attn" and not is_vit:
            raise ValueError(f"method {self.name!r}: attention-only LoRA needs a backbone with attention blocks")
        targets = SCOPES["attn"] if self.scope == "attn" else SCOPES["all-vit" if is_vit else "all-conv"]
        return LoraConfig(r=self.rank, alpha=float(self.rank), targets=targets, use_dora=self.use_dora,
                          freeze_A=self.freeze_A)


def parse_method(name: str) -> MethodSpec:
    """``ncm``, ``pixel-nn``, ``raw-nn``, ``linear``, ``full``, ``scratch``, ``lora-r8``, ``lora-attn-r4``,
    ``lora-all-r16``, ``dora-r8``, ``lorafa-r8`` (LoRA-FA: A frozen, only B trains).

    - ``pixel-nn``: 1-nearest-neighbour (Euclidean) on the eval-transformed, normalised model input.
    - ``raw-nn``: 1-nearest-neighbour (Euclidean) on the untransformed images as stored (raw pixels).
    - ``scratch``: ``full`` from random initialisation (the backbone built without its pretrained weights), at the
      larger backbone learning rate random weights need.

    Any of ``ncm``, ``linear``, ``full`` and the LoRA/DoRA names takes a ``-cos`` suffix (``lora-r2-cos``,
    ``ncm-cos``; ``-cos16`` for scale 16): its head is the cosine head of the class means (``COSINE_SCALE``
    unless given), so ``ncm-cos`` is the cosine nearest class mean and the others start from it.

    ``-ncc`` after those (``lora-r2-ncc``, ``full-ncc``; a cosine head of ``COSINE_SCALE`` unless ``-cos<scale>``
    says otherwise): the adapter trains by the nearest-centroid loss (``objective``), not through the head.

    Last come ``-lr<rate>`` (``lora-r2-cos-lr1e-3``: the learning rate of the LoRA factors or, for ``full``, the
    backbone) and ``-hlr<rate>`` (the head's; for ``linear`` both are the head's), in any order, for methods that
    train.

    LoRA's ``alpha`` equals its rank (scale 1), so ranks compare at the same learning rate.
    """
    rate = LR_PATTERN.fullmatch(name)
    if rate is not None:
        base = parse_method(rate["base"])
        if not base.trains or float(rate["lr"]) <= 0:
            raise ValueError(f"method {name!r}: -lr<rate> needs a method that trains and a rate > 0")
        value = float(rate["lr"])
        both = base.method == "linear"
        changes = {"lr": value, "head_lr": value} if both else {"head_lr" if rate["which"] == "hlr" else "lr": value}
        return dataclasses.replace(base, name=name, **changes)
    ncc = NCC_PATTERN.fullmatch(name)
    if ncc is not None:
        base = parse_method(ncc["base"])
        if base.method not in ("lora", "full") or not base.pretrained:
            raise ValueError(f"method {name!r}: -ncc needs a LoRA/DoRA method or full (it adapts the features)")
        return dataclasses.replace(base, name=name, objective="ncc", cosine_scale=base.cosine_scale or COSINE_SCALE)
    cosine = COSINE_PATTERN.fullmatch(name)
    if cosine is not None and cosine["base"] not in (*NEAREST_NEIGHBOUR, "scratch"):
        scale = float(cosine["scale"]) if cosine["scale"] else COSINE_SCALE
        if scale <= 0:
            raise ValueError(f"method {name!r}: the cosine scale must be > 0")
        return dataclasses.replace(parse_method(cosine["base"]), name=name, cosine_scale=scale)
    if name in ("ncm", *NEAREST_NEIGHBOUR):
        return MethodSpec(name, name)
    if name == "linear":
        return MethodSpec(name, "linear", lr=1e-2, head_lr=1e-2)
    if name == "full":
        return MethodSpec(name, "full", lr=5e-4, head_lr=3e-3)
    if name == "scratch":
        return MethodSpec(name, "full", lr=2e-3, head_lr=3e-3, pretrained=False)
    match = METHOD_PATTERN.fullmatch(name)
    if match is None or int(match["rank"]) < 1:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(NAMED)}, or lora-r<rank>, "
                         f"lora-attn-r<rank>, lora-all-r<rank>, dora-r<rank>, lorafa-r<rank> (rank >= 1), "
                         f"each but the nearest "
                         f"neighbours and scratch with an optional -cos or -cos<scale> suffix, LoRA/full with -ncc, "
                         f"and the trained ones with last -lr<rate> and/or -hlr<rate>")
    return MethodSpec(name, "lora", rank=int(match["rank"]), scope=match["scope"] or "all",
                      use_dora=match["kind"] == "dora", freeze_A=match["kind"] == "lorafa")
