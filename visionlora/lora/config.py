"""The knobs of a LoRA adaptation, in one dataclass.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) freezes a
pretrained weight W ∈ R^{out×in} and learns ΔW = scale · B·A with A ∈ R^{r×in}, B ∈ R^{out×r}. The textbook
notation (W ∈ R^{m×n}, ΔW = A·B with A ∈ R^{m×r}, B ∈ R^{r×n}) is the same thing transposed: our B is the
textbook A and our A is the textbook B (see docs/maths.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INITS = ("default", "gaussian", "small-random", "pissa")
FORMS = ("auto", "activation", "weight", "fused", "fused-split")
QKV_SLICES = "qkv"
# A target may end with "@" plus a subset of "qkv" to adapt only those slices of a fused qkv projection.
SLICE_SEPARATOR = "@"

# Named presets: each is a list of regexes matched against the *full* module path (re.fullmatch).
PRESETS: dict[str, list[str]] = {
    "attn": [r"(.*\.)?attn\.(qkv|proj|in_proj|out_proj|q_proj|k_proj|v_proj)", r"(.*\.)?attn"],
    "attn-qv": [r"(.*\.)?attn\.qkv@qv", r"(.*\.)?attn\.(q_proj|v_proj)", r"(.*\.)?attn@qv"],
    "vit-all": [
        r"(.*\.)?attn\.(qkv|proj|in_proj|out_proj|q_proj|k_proj|v_proj)",
        r"(.*\.)?attn",
        r"(.*\.)?mlp\.(fc1|fc2|fc1_g|fc1_x|c_fc|c_proj)",
    ],
    "conv": [r"<conv>"],
    "conv-pointwise": [r"<conv1x1>"],
}


@dataclass
class LoraConfig:
    """What to adapt and how.

    Args:
        r: Rank of each update ΔW = scale·B·A (per group for grouped convs).
        alpha: Scaling numerator: scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``.
        targets: Preset names (``attn``, ``attn-qv``, ``vit-all``, ``conv``, ``conv-pointwise``) or regexes that
            must match a module's full dotted path (``re.fullmatch``, so ``proj`` never catches
            ``patch_embed.proj``). Append ``@qv`` (any subset of ``qkv``) to adapt only those slices of a fused
            qkv projection.
        exclude: Regexes on the full path; matching modules are never adapted.
        rank_pattern: Per-layer rank overrides, ``{regex: r}``; the first regex that fully matches wins.
        alpha_pattern: Per-layer alpha overrides, ``{regex: alpha}``.
        dropout: Dropout on the input of the LoRA branch (Hu et al. use 0.0-0.1). 0 costs nothing.
        init: ``default`` (A Kaiming-uniform, B zero: output unchanged at init), ``gaussian`` (A ~ N(0, std 1/r),
            B zero), ``small-random`` (A and B both N(0, 0.02²): the output changes at init, as some textbooks
            describe), ``pissa`` (principal singular vectors in A, B; the base weight keeps the residual,
            Meng et al. 2024, arXiv:2404.02948).
        use_rslora: scale = alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732).
        use_dora: Weight-decomposed LoRA: a trainable per-output-channel magnitude (Liu et al. 2024,
            arXiv:2402.09353). Linear and Conv2d.
        trainable: Regexes of extra modules trained fully (e.g. a detection head). The classifier head
            (``model.get_classifier()``) is trained fully by default.
        train_head: Train the classifier head found by ``get_classifier()``.
        train_norms: Make normalization layers' affine parameters trainable.
        freeze_bn_stats: Keep BatchNorm running statistics frozen (eval mode) while the backbone is frozen.
        split_qkv: Give each of q, k, v of a fused qkv Linear its own factors (Hu et al.'s setting). False
            treats the fused weight as one matrix, as PEFT does.
        form: ``auto`` times per layer, on the first training step, the forms the layer has: the activation-space
            form (op(x) + x·Aᵀ·Bᵀ), the weight-space form (op(x, W + ΔW)) and the fused form (A rides in the
            frozen op's own GEMM/conv, see ``visionlora/lora/fused.py``), which wins unless another is 25% faster;
            ``activation``, ``weight`` or ``fused`` force one (``fused`` falls back to what ``auto`` picks among
            the others where a layer has none: DoRA, dropout, StdConv2d/Conv2dSame). ``fused-split`` forces the
            fused form's second layout for Linears (a contiguous output, h = x·Aᵀ as its own thin GEMM; convs run
            ``fused``), which ``auto`` also measures. Results agree to float rounding.
        freeze_A: LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): A is a seeded random projection (Kaiming-uniform
            from ``A_seed`` and the module path), frozen; only B (and the head) trains. Tasks trained with the
            same seed share one A in memory when loaded onto one backbone (see ``visionlora/lora/frozen_a.py``).
        A_seed: The seed of LoRA-FA's A.
    """

    r: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["attn"])
    exclude: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    use_dora: bool = False
    trainable: list[str] = field(default_factory=list)
    train_head: bool = True
    train_norms: bool = False
    freeze_bn_stats: bool = True
    split_qkv: bool = True
    form: str = "auto"
    freeze_A: bool = False
    A_seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if self.form not in FORMS:
            raise ValueError(f"LoraConfig.form must be one of {FORMS}, got {self.form!r}")
        if self.freeze_A and self.init == "pissa":
            raise ValueError("LoraConfig.freeze_A: LoRA-FA freezes A at a seeded random projection, but init='pissa' "
                             "sets A to the weight's principal directions; use another init")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name a preset or a module-path regex")
        for name, pattern in self.rank_pattern.items():
            if not isinstance(pattern, int) or pattern <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{name!r}] must be a positive integer, got {pattern!r}")
        for name, value in self.alpha_pattern.items():
            if value <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{name!r}] must be > 0, got {value!r}")
        for pattern in self.exclude + self.trainable + list(self.rank_pattern) + list(self.alpha_pattern):
            _compile(pattern, "exclude/trainable/rank_pattern/alpha_pattern")
        for target in self.expanded_targets():
            _compile(target[0], "targets")

    def expanded_targets(self) -> list[tuple[str, str]]:
        """Targets with presets expanded, as (regex, qkv slices) pairs."""
        return [pair for target in self.targets for pair in expand_target(target)]

    def rank_for(self, path: str) -> int:
        """The rank for module ``path``: the first fully matching ``rank_pattern`` entry, else ``r``."""
        return _first_match(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """The alpha for module ``path``: the first fully matching ``alpha_pattern`` entry, else ``alpha``."""
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_for(self, path: str, rank: int) -> float:
        """scale = alpha / r (Hu et al.) or alpha / sqrt(r) with rsLoRA."""
        alpha = self.alpha_for(path)
        return alpha / rank**0.5 if self.use_rslora else alpha / rank


def expand_target(target: str) -> list[tuple[str, str]]:
    """One target (preset name or regex, optionally with ``@slices``) as (regex, qkv slices) pairs."""
    if target in PRESETS:
        return [split_slices(p) for p in PRESETS[target]]
    if target.startswith("<") and target.endswith(">") and target not in ("<conv>", "<conv1x1>"):
        raise ValueError(f"LoraConfig.targets: unknown preset {target!r}; presets are {sorted(PRESETS)}")
    if re.fullmatch(r"[a-z]+(-[a-z]+)+", target):
        # Looks like a preset name (regexes rarely contain a bare hyphenated word): fail loudly on a typo.
        raise ValueError(f"LoraConfig.targets: unknown preset {target!r}; presets are {sorted(PRESETS)}")
    return [split_slices(target)]


def split_slices(target: str) -> tuple[str, str]:
    """Split ``"regex@qv"`` into ``("regex", "qv")``; a plain regex adapts all of q, k and v."""
    head, sep, tail = target.rpartition(SLICE_SEPARATOR)
    if sep and tail and set(tail) <= set(QKV_SLICES):
        ordered = "".join(s for s in QKV_SLICES if s in tail)
        return head, ordered
    return target, QKV_SLICES


def _compile(pattern: str, field_name: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{field_name}: invalid regex {pattern!r}: {err}") from None


def _first_match(patterns: dict, path: str, default):
    for pattern, value in patterns.items():
        if re.fullmatch(pattern, path):
            return value
    return default
