"""Frozen architecture configs and a registry of named variants.

A variant is the whole architecture of a text-to-image model: transformer, text encoder and autoencoder.
Training hyper-parameters live in training/config.py, not here: the same architecture is trained by
several recipes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fewstep.errors import UsageError


@dataclass(frozen=True)
class AutoencoderConfig:
    """Small convolutional VAE: 32×32×3 images <-> (latent_channels, 32/2^levels, 32/2^levels)."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)  # one entry per resolution; len - 1 downsamplings
    # latent = (encoder_mean - shift) * scale; measured on the data after training (like SD's 0.18215)
    scale: float = 1.0
    shift: float = 0.0


@dataclass(frozen=True)
class TextEncoderConfig:
    """Word-level transformer encoder trained with the teacher (a stand-in for Flux's T5 + CLIP)."""

    vocab_size: int = 64
    max_length: int = 12  # tokens incl. BOS; captions are padded to this, so batches never change shapes
    dim: int = 128
    depth: int = 2
    heads: int = 4


@dataclass(frozen=True)
class TransformerConfig:
    """The Flux-style MM-DiT (FluxParams in black-forest-labs/flux, scaled down)."""

    in_channels: int = 4  # latent channels (3 in pixel space)
    patch_size: int = 1
    hidden_size: int = 256
    num_heads: int = 4
    mlp_ratio: float = 4.0
    depth_double: int = 2  # double-stream blocks: text and image weights apart, one joint attention
    depth_single: int = 4  # single-stream blocks over cat(text, image)
    axes_dim: tuple[int, int, int] = (16, 24, 24)  # RoPE dims over (index, row, col); sums to head_dim
    theta: int = 10_000
    qk_norm_eps: float = 1e-6
    guidance_embed: bool = False  # guidance-distilled students take the CFG scale as an input
    # FLUX.1-dev multiplies the guidance scale by 1000 before the sinusoidal embedding, as it does t: with 1 most
    # of the 256 dimensions barely move for w in 1-5. Checkpoints saved before this field existed used 1.
    guidance_factor: float = 1000.0
    context_dim: int | None = None  # width of the text tokens (T5: 4096); None: the text encoder's dim
    pooled_dim: int | None = None  # width of the pooled text vector (CLIP: 768); None: the text encoder's dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole text-to-image model."""

    name: str
    transformer: TransformerConfig
    text: TextEncoderConfig
    autoencoder: AutoencoderConfig | None = field(default_factory=AutoencoderConfig)  # None: pixel space
    image_size: int = 32

    @property
    def latent_size(self) -> int:
        if self.autoencoder is None:
            return self.image_size
        return self.image_size // 2 ** (len(self.autoencoder.channels) - 1)

    @property
    def latent_channels(self) -> int:
        return 3 if self.autoencoder is None else self.autoencoder.latent_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, d)

    def with_overrides(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def config_from_dict(cls: type, d: dict[str, Any] | None) -> Any:
    """A (nested) frozen config from its dict form; unknown fields are an error."""
    if d is None:
        return None
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            kwargs[name] = config_from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_NESTED = {
    ("ModelConfig", "transformer"): TransformerConfig,
    ("ModelConfig", "text"): TextEncoderConfig,
    ("ModelConfig", "autoencoder"): AutoencoderConfig,
}

# ---- registry of named variants -------------------------------------------------------------------------

VARIANTS: dict[str, ModelConfig] = {
    # for tests: builds and runs a step in milliseconds
    "tiny": ModelConfig(
        name="tiny",
        transformer=TransformerConfig(
            hidden_size=32, num_heads=2, depth_double=1, depth_single=1, axes_dim=(4, 6, 6), mlp_ratio=2.0
        ),
        text=TextEncoderConfig(dim=16, depth=1, heads=2),
        autoencoder=AutoencoderConfig(channels=(8, 8, 16)),
    ),
    "tiny-pixel": ModelConfig(
        name="tiny-pixel",
        transformer=TransformerConfig(
            in_channels=3,
            patch_size=4,
            hidden_size=32,
            num_heads=2,
            depth_double=1,
            depth_single=1,
            axes_dim=(4, 6, 6),
            mlp_ratio=2.0,
        ),
        text=TextEncoderConfig(dim=16, depth=1, heads=2),
        autoencoder=None,
    ),
    # the colored-digits teacher: 16 latent tokens (8×8×4 latents, 2×2 patches, as Flux) + 12 text tokens.
    # Patch 2 trains ~2.3× more images/s than patch 1 on a 2-core CPU at the same width (benchmarks/).
    "digits": ModelConfig(
        name="digits",
        transformer=TransformerConfig(patch_size=2),
        text=TextEncoderConfig(),
        autoencoder=AutoencoderConfig(),
    ),
}


def get_variant(name: str) -> ModelConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}") from None
