"""Configuration dataclasses and presets for SOHO.

One config system: ``SohoConfig`` groups the grid encoder, the visual dictionary (VD), the cross-modal
transformer and the pre-training objective. ``to_dict``/``from_dict`` give a JSON-able round trip used by
checkpoints and ``save_pretrained``. Presets are plain functions (``soho_tiny``/``soho_small``/``soho_base``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from soho.text import default_text_model_path

RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = ("tiny", *RESNET_BACKBONES)
# torchvision's original ImageNet weights (``pretrained=True`` before torchvision 0.13), which the paper and
# its reference code started from; the only enum every ResNet here has (resnet18/34 have no V2).
IMAGENET_WEIGHTS = "IMAGENET1K_V1"
NO_WEIGHTS = "none"


def normalise_weights(weights: str | None) -> str | None:
    """``None``/"none"/"" -> None (random init), "imagenet" -> ``IMAGENET_WEIGHTS``, anything else as is."""
    if weights is None:
        return None
    w = str(weights).strip()
    if w.lower() in (NO_WEIGHTS, "", "null", "random"):
        return None
    if w.lower() == "imagenet":
        return IMAGENET_WEIGHTS
    return w


def weights_is_path(weights: str) -> bool:
    """A ``weights`` value meant as a local state-dict file rather than a torchvision weights name."""
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".safetensors"))


@dataclass
class GridEncoderConfig:
    """Visual encoder E: ResNet trunk → 2×2 max-pool → 1×1 conv to the transformer width c."""

    backbone: str = "resnet18"
    """"resnet18" | "resnet34" | "resnet50" | "resnet101" (torchvision), or "tiny": a narrow trunk built from
    torchvision's BasicBlock for CPU tests (stem + ``len(tiny_blocks)`` stages)."""
    weights: str | None = None
    """Initial weights of a torchvision ResNet trunk: None (or "none") = random init; "imagenet" (=
    ``IMAGENET_WEIGHTS``) or another torchvision weights enum name such as "IMAGENET1K_V2", loaded through
    torchvision's weights API from its cache ``$TORCH_HOME/hub/checkpoints/`` (downloaded there when missing
    and the machine is online); or a local state-dict file (.safetensors / .pt / .pth, loaded with
    weights_only=True). The small/base presets start from ImageNet, as the paper does; "tiny" has none."""
    out_dim: int = 384
    """c, the width of each visual token; must equal the transformer hidden size and the VD dim."""
    pool: int = 2
    """Max-pool kernel = stride after the trunk (the paper's 2×2); 1 disables it."""
    tiny_width: int = 16
    """Channels of the first tiny stage (doubled each stage). Only for backbone="tiny"."""
    tiny_blocks: list[int] = field(default_factory=lambda: [1, 1])
    """BasicBlocks per tiny stage; each stage after the first halves the resolution."""

    @property
    def trunk_stride(self) -> int:
        if self.backbone == "tiny":
            # stem: 7×7 conv stride 2 + 3×3 max-pool stride 2; then stride 2 per stage after the first
            return 4 * 2 ** (len(self.tiny_blocks) - 1)
        return 32

    @property
    def total_stride(self) -> int:
        """Pixels per visual-token side; the loader pads images to a multiple of it."""
        return self.trunk_stride * self.pool

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"GridEncoderConfig.backbone={self.backbone!r}: expected one of {BACKBONES}")
        if self.pool < 1:
            raise ValueError(f"GridEncoderConfig.pool={self.pool}: must be >= 1")
        if self.out_dim < 4 or self.out_dim % 4:
            raise ValueError(
                f"GridEncoderConfig.out_dim={self.out_dim}: must be a positive multiple of 4 "
                "(the 2-D sinusoidal position embedding splits it into row/column sin/cos quarters)"
            )
        if self.backbone == "tiny" and normalise_weights(self.weights) is not None:
            raise ValueError(
                f"GridEncoderConfig.weights={self.weights!r}: the tiny trunk is not a torchvision ResNet "
                "and has no pretrained weights; use weights=None ('none') or a resnet backbone"
            )
        if self.backbone == "tiny" and (not self.tiny_blocks or min(self.tiny_blocks) < 1):
            raise ValueError(
                f"GridEncoderConfig.tiny_blocks={self.tiny_blocks}: need >= 1 stage of >= 1 block"
            )


@dataclass
class VDConfig:
    """Visual dictionary D ∈ R^{k×c}, updated by d̂_j = γ·d_j + (1−γ)·mean(features assigned to j)."""

    num_codes: int = 2048
    """k, the number of dictionary entries."""
    dim: int = 384
    """c, the width of each entry (= the visual feature width)."""
    decay: float = 0.99
    """γ, the moving-average decay of the codebook update (the reference code fixes 0.4)."""
    decay_warmup_steps: int = 0
    """0 = off. Otherwise γ rises linearly from ``decay_warmup_start`` to ``decay`` over this many updates,
    so early (random) codes move quickly toward real features."""
    decay_warmup_start: float = 0.5
    init_std: float = 1.0
    """Standard deviation of the random normal initial codebook."""
    restart_dead_codes: bool = False
    """Off by default. Codes unused for ``dead_code_window`` updates are re-seeded from this step's
    (already all-reduced) cluster means plus noise from a generator seeded by the step count, so every
    rank restarts identically without extra communication."""
    dead_code_window: int = 100
    """Updates without an assignment after which a code counts as dead (health + restart)."""
    restart_noise: float = 0.01
    """Relative noise added to a re-seeded code (× the RMS of its source mean)."""
    usage_window: int = 100
    """Updates over which ``usage_ratio`` counts a code as used."""
    histogram_decay: float = 0.99
    """Decay of the moving code histogram behind the perplexity statistic."""
    enabled: bool = True
    """False = the "no VD" ablation: grid features go straight into the transformer (no lookup, no
    update); MVM has no VD labels then, so ``pretrain.mvm_prob`` must be 0."""
    transformer_input: str = "quantized"
    """What the transformer sees of each visual token. "quantized" (the paper): the selected code, with the
    straight-through gradient to the feature. "features": the grid feature itself; the dictionary still
    assigns every token (updating its codes) and serves only as the MVM target and the unit MVM masks (an
    ablation that separates the dictionary's two roles)."""

    def validate(self) -> None:
        if self.num_codes < 2:
            raise ValueError(f"VDConfig.num_codes={self.num_codes}: need at least 2 codes")
        if self.dim < 1:
            raise ValueError(f"VDConfig.dim={self.dim}: must be positive")
        for name in ("decay", "decay_warmup_start", "histogram_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"VDConfig.{name}={value}: must be in [0, 1)")
        if self.transformer_input not in ("quantized", "features"):
            raise ValueError(
                f"VDConfig.transformer_input={self.transformer_input!r}: 'quantized' or 'features'")
        for name in ("decay_warmup_steps", "dead_code_window", "usage_window"):
            if getattr(self, name) < 0 or (name != "decay_warmup_steps" and getattr(self, name) == 0):
                raise ValueError(f"VDConfig.{name}={getattr(self, name)}: out of range")


@dataclass
class TransformerConfig:
    """Cross-modal BERT. Architecture fields must match the pretrained weights at ``name_or_path``."""

    name_or_path: str | None = None
    """None = random init; a local BERT directory (offline default: the packaged MiniLM) or a hub name such
    as "bert-base-uncased" (downloads only when the user asks for it)."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    """With a pretrained ``name_or_path`` it may be below that model's depth: its first ``num_layers`` layers
    are loaded (truncated init, e.g. 2 of MiniLM's 6 for CPU recipes); more is an error."""
    num_heads: int = 12
    intermediate_size: int = 1536
    max_text_len: int = 512
    """BERT's max_position_embeddings: the longest caption ([CLS] … [SEP]) the model accepts."""
    type_vocab_size: int = 2
    """Token-type rows: 0 = text, 1 = visual (our modality embedding reuses BERT's token-type table)."""
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    """Std of the normal init of a randomly initialised BERT (BERT's 0.02); ignored for pretrained weights."""
    attn_implementation: str = "sdpa"
    """"sdpa" or "eager"; both take our additive 4-D attention mask."""
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    first_regular_token_id: int = 999
    """MLM's "random token" replacement samples ids in [first_regular_token_id, vocab_size): in the
    bert-base-uncased vocab the ids below are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]."""

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TransformerConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.type_vocab_size < 2:
            raise ValueError("TransformerConfig.type_vocab_size must be >= 2 (text and visual modality)")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"TransformerConfig.attn_implementation={self.attn_implementation!r}: "
                "expected 'sdpa' or 'eager'"
            )
        for name in (
            "pad_token_id",
            "cls_token_id",
            "sep_token_id",
            "mask_token_id",
            "first_regular_token_id",
        ):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"TransformerConfig.{name}={getattr(self, name)} outside vocab_size={self.vocab_size}"
                )


@dataclass
class PretrainConfig:
    """The three pre-training tasks (equal weights): L = L_MLM + L_MVM + L_ITM."""

    mlm_prob: float = 0.15
    """Fraction of real caption tokens ([CLS]/[SEP]/[PAD] excluded) chosen for MLM."""
    mlm_mask_ratio: float = 0.8
    """Of the chosen tokens: this fraction becomes [MASK] …"""
    mlm_random_ratio: float = 0.1
    """… this fraction a random token; the rest stay unchanged (80/10/10)."""
    mvm_prob: float = 0.5
    """Per-sample probability of MVM masking (one VD index, all its tokens). The reference uses 0.015,
    which gives MVM almost no signal; 0.5 makes MVM a real third task while leaving half the images intact
    for ITM/MLM."""
    itm_neg_prob: float = 0.5
    """Probability that a sample's caption is swapped with another sample's (ITM negative)."""
    hard_negatives: bool = False
    """Off = the swap partner is uniform over the other samples. On = partners are drawn with probability
    ∝ exp(cos-sim / temperature): with ITC on (``itc_weight`` > 0) the ITC similarity of image i and caption j
    (ALBEF's mining: captions the contrastive space confuses with the image's own); without it, that of the
    two images' mean visual features (captions of similar-looking images)."""
    hard_negative_temperature: float = 0.1
    itm_interaction: bool = False
    """False = the paper's ITM head φ([CLS]). True = φ([CLS]) + an MLP over the product and difference of the
    mean text and mean visual outputs of the same pass (``soho.heads.ITMHead``): lets a randomly initialised
    transformer leave the ITM plateau (the CPU recipe); pretrained text+vision backbones do not need it."""
    itc_weight: float = 0.0
    """0 = off (the paper's three tasks). > 0 adds ALBEF's image-text contrastive term with this weight:
    L += w·InfoNCE between an image-only and a text-only pass of the same transformer (mean outputs →
    ``soho.heads.ContrastiveProjection``), on the uncorrupted batch. It aligns the single-modality
    representations before the joint pass has to fuse them ("align before fuse"); on the CPU recipe it
    brings held-out ITM out of chance within ~250 steps instead of ~500 (docs/RESULTS.md). Retrieval
    fine-tuning starts its prefilter projection from this one."""
    itc_embed_dim: int = 256
    """Width of the shared ITC space (the retrieval prefilter's default)."""
    mvm_head_tied: bool = False
    """False = MVM classifier is a free k-way linear layer; True = its weights are the VD codebook (dot
    product with the current codes)."""

    def validate(self) -> None:
        for name in ("mlm_prob", "mlm_mask_ratio", "mlm_random_ratio", "mvm_prob", "itm_neg_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PretrainConfig.{name}={value}: must be in [0, 1]")
        if self.mlm_mask_ratio + self.mlm_random_ratio > 1.0:
            raise ValueError("PretrainConfig.mlm_mask_ratio + mlm_random_ratio must be <= 1")
        if self.hard_negative_temperature <= 0:
            raise ValueError("PretrainConfig.hard_negative_temperature must be > 0")
        if self.itc_weight < 0:
            raise ValueError(f"PretrainConfig.itc_weight={self.itc_weight}: must be >= 0 (0 = off)")
        if self.itc_embed_dim < 1:
            raise ValueError(f"PretrainConfig.itc_embed_dim={self.itc_embed_dim}: must be positive")


_SECTIONS = {
    "encoder": GridEncoderConfig,
    "vd": VDConfig,
    "transformer": TransformerConfig,
    "pretrain": PretrainConfig,
}


@dataclass
class SohoConfig:
    encoder: GridEncoderConfig = field(default_factory=GridEncoderConfig)
    vd: VDConfig = field(default_factory=VDConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def hidden_size(self) -> int:
        return self.transformer.hidden_size

    def validate(self) -> None:
        for name in _SECTIONS:
            getattr(self, name).validate()
        c = self.transformer.hidden_size
        if self.encoder.out_dim != c or self.vd.dim != c:
            raise ValueError(
                f"SohoConfig: encoder.out_dim={self.encoder.out_dim}, vd.dim={self.vd.dim} and "
                f"transformer.hidden_size={c} must be equal (one width c for visual tokens and text)"
            )
        if not self.vd.enabled and self.pretrain.mvm_prob > 0:
            raise ValueError(
                f"SohoConfig: vd.enabled=False but pretrain.mvm_prob={self.pretrain.mvm_prob}: "
                "MVM predicts VD indices, so the no-VD ablation needs pretrain.mvm_prob=0"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SohoConfig:
        if not isinstance(d, dict):
            raise TypeError(f"SohoConfig.from_dict: expected a dict, got {type(d).__name__}")
        unknown = set(d) - set(_SECTIONS)
        if unknown:
            raise ValueError(
                f"SohoConfig.from_dict: unknown sections {sorted(unknown)}; expected {list(_SECTIONS)}"
            )
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"SohoConfig.from_dict: unknown keys {sorted(bad)} in section {name!r}")
            sections[name] = section_cls(**values)
        return cls(**sections)


def soho_tiny() -> SohoConfig:
    """CPU-test flavour (seconds): narrow BasicBlock trunk, total stride 16 (128 px → 8×8 = 64 tokens),
    c=128, 2 layers, 4 heads, k=128, random init (std 0.2), bert-base-uncased vocab."""
    c = 128
    return SohoConfig(
        encoder=GridEncoderConfig(backbone="tiny", out_dim=c, tiny_width=16, tiny_blocks=[1, 1]),
        vd=VDConfig(num_codes=128, dim=c, decay=0.9),
        transformer=TransformerConfig(
            name_or_path=None,
            hidden_size=c,
            num_layers=2,
            num_heads=4,
            intermediate_size=4 * c,
            max_text_len=128,
            # 0.2 lets the tiny model memorise ITM on 8 pairs in tens of steps (tests/model/test_overfit.py).
            # On held-out scenes neither 0.02 nor 0.2 leaves the [CLS]-only ITM plateau (2,000 steps
            # measured); pretrain.itm_interaction does (docs/RESULTS.md), and the CPU recipe sets 0.02.
            initializer_range=0.2,
        ),
        pretrain=PretrainConfig(),
    )


def soho_small() -> SohoConfig:
    """One-GPU model: torchvision ResNet-18 from ImageNet (``IMAGENET_WEIGHTS``; ``weights=None`` for random
    init on a machine without them) + the packaged MiniLM-L6-H384 BERT, c=384, k=2048, total stride 64
    (the reference code's)."""
    c = 384
    return SohoConfig(
        encoder=GridEncoderConfig(backbone="resnet18", weights=IMAGENET_WEIGHTS, out_dim=c),
        vd=VDConfig(num_codes=2048, dim=c),
        transformer=TransformerConfig(
            name_or_path=default_text_model_path(),
            hidden_size=c,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            max_text_len=512,
        ),
    )


def soho_base() -> SohoConfig:
    """The paper's model: ImageNet ResNet-101 (``IMAGENET_WEIGHTS``) + BERT-base (12 layers, c=768), k=2048.
    Both are downloaded when building unless cached: the ResNet in ``$TORCH_HOME/hub/checkpoints``,
    "bert-base-uncased" in the Hugging Face cache (the k8s image carries both)."""
    c = 768
    return SohoConfig(
        encoder=GridEncoderConfig(backbone="resnet101", weights=IMAGENET_WEIGHTS, out_dim=c),
        vd=VDConfig(num_codes=2048, dim=c),
        transformer=TransformerConfig(
            name_or_path="bert-base-uncased",
            hidden_size=c,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            max_text_len=512,
        ),
    )


PRESETS = {"tiny": soho_tiny, "small": soho_small, "base": soho_base}


def get_preset(name: str) -> SohoConfig:
    """``get_preset("tiny" | "small" | "base")``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown SOHO preset {name!r}; expected one of {sorted(PRESETS)}") from None
