"""A text-to-image model: tokenizer + text encoder + MM-DiT + autoencoder, and how to sample it.

This is what training exports, what ``fewstep sample`` runs and what the server serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import nn

from fewstep.models.autoencoder import Autoencoder
from fewstep.models.checkpoint import Card, CheckpointError, Sampling, read_card, save_checkpoint, verify_file
from fewstep.models.config import AutoencoderConfig, ModelConfig, config_from_dict
from fewstep.models.flow import consistency_function
from fewstep.models.flow import timesteps as make_timesteps
from fewstep.models.mmdit import MMDiT
from fewstep.models.sampling import sample_euler, sample_x0, seeded_noise, velocity_denoiser
from fewstep.models.sizes import Sizes
from fewstep.models.text import TextCond, TextEncoder, Tokenizer

MAX_STUDENT_STEPS = 8  # a student samples any count up to this on the uniform grid; it serves what was measured
TRANSFORMER, TEXT_ENCODER, AUTOENCODER, TOKENIZER = (
    "transformer.safetensors",
    "text_encoder.safetensors",
    "autoencoder.safetensors",
    "tokenizer.json",
)


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """An autoencoder checkpoint (role "autoencoder") as written by the autoencoder training stage."""
    from fewstep.models.checkpoint import load_weights

    card = read_card(directory)
    if card.role != "autoencoder":
        raise CheckpointError(f"{Path(directory) / 'card.json'}: role is {card.role!r}, expected 'autoencoder'")
    try:
        cfg = config_from_dict(AutoencoderConfig, card.model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(directory) / 'card.json'}: model: {e}") from None
    ae = Autoencoder(cfg)
    load_weights(directory, card, AUTOENCODER, ae)
    return ae.to(device).eval().requires_grad_(False)


def with_legacy_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A card's architecture with the values that fields added later had before they existed: a guidance-embedded
    transformer saved without ``guidance_factor`` embedded the scale times 1, not FLUX.1-dev's 1000."""
    tf = model.get("transformer")
    if isinstance(tf, dict) and tf.get("guidance_embed") and "guidance_factor" not in tf:
        return {**model, "transformer": {**tf, "guidance_factor": 1.0}}
    return model


@dataclass
class TextToImage:
    config: ModelConfig
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    transformer: MMDiT
    autoencoder: Autoencoder | None
    card: Card | None = None
    kernel_mode: str = "torch"  # "auto" | "triton" | "torch" (kernels.runtime); re-resolved by to()
    # generate() keeps no per-call state on the model, so two threads may run it at once (the server's CPU throughput
    # mode, server/streams.py); a diffusers pipeline keeps its scheduler's state on itself and does not say so
    reentrant: ClassVar[bool] = True

    @classmethod
    def build(cls, config: ModelConfig, tokenizer: Tokenizer, autoencoder: Autoencoder | None = None) -> TextToImage:
        if config.text.vocab_size < len(tokenizer):
            raise ValueError(f"text vocab_size {config.text.vocab_size} < tokenizer's {len(tokenizer)} words")
        if autoencoder is not None and config.autoencoder is None:
            raise ValueError(f"model {config.name!r} works in pixel space but an autoencoder was given")
        if autoencoder is None and config.autoencoder is not None:
            autoencoder = Autoencoder(config.autoencoder)
        return cls(
            config=config,
            tokenizer=tokenizer,
            text_encoder=TextEncoder(config.text),
            transformer=MMDiT(config.transformer, config.text.dim, config.latent_size),
            autoencoder=autoencoder,
        )

    # ---- properties of the loaded model --------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.card.name if self.card else self.config.name

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.config.latent_size, self.config.latent_size)

    @property
    def sampling(self) -> Sampling:
        if self.card is None or self.card.sampling is None:
            return Sampling(default_steps=40, any_steps=True, timesteps={"40": make_timesteps(40)})
        return self.card.sampling

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {TRANSFORMER: self.transformer, TEXT_ENCODER: self.text_encoder}
        if self.autoencoder is not None:
            mods[AUTOENCODER] = self.autoencoder
        return mods

    def to(self, device: str | torch.device) -> TextToImage:
        for m in self.modules().values():
            m.to(device).eval().requires_grad_(False)
        return self.use_kernels(self.kernel_mode)

    def use_kernels(self, mode: str) -> TextToImage:
        """Pick the kernel backend for this model's device: "auto" = Triton on CUDA, PyTorch elsewhere.

        Raises kernels.runtime.KernelError when a forced "triton" cannot run here.
        """
        from fewstep.kernels.runtime import resolve

        self.transformer.set_kernels(resolve(mode, self.device))
        self.kernel_mode = mode
        return self

    def use_graphs(self, on: bool = True) -> TextToImage:
        """Serving on a CPU: the transformer's, text encoder's and decoder's inference as frozen TorchScript graphs
        that run without the GIL (models/graphs.py); for serving, not for a model that trains."""
        self.transformer.use_graphs(on)
        self.text_encoder.use_graphs(on)
        if self.autoencoder is not None:
            self.autoencoder.use_graphs(on)
        return self

    @property
    def uses_graphs(self) -> bool:
        return self.transformer.graphs is not None

    @property
    def kernels(self) -> str:
        """The backend in use: "torch" or "triton"."""
        return self.transformer.kernels

    # ---- sampling ---------------------------------------------------------------------------------------
    def grid(self, steps: int) -> list[float]:
        """The time grid for ``steps``: listed in the card; else the teacher's schedule; else, for a student, the
        uniform grid (a flow or consistency student runs any step count; which counts it *serves* is measured:
        Card.serves_steps)."""
        s = self.sampling
        if str(steps) in s.timesteps:
            return s.timesteps[str(steps)]
        if s.any_steps and 1 <= steps <= s.max_steps:
            return make_timesteps(steps, s.schedule, s.shift)
        if self._is_student and 1 <= steps <= MAX_STUDENT_STEPS:
            return make_timesteps(steps)
        raise ValueError(f"{self.name} supports steps {self.steps_text()}, not {steps}")

    def supports(self, steps: int) -> bool:
        """Whether ``steps`` can be sampled (see grid)."""
        s = self.sampling
        return (
            str(steps) in s.timesteps
            or (s.any_steps and 1 <= steps <= s.max_steps)
            or (self._is_student and 1 <= steps <= MAX_STUDENT_STEPS)
        )

    def steps_text(self) -> str:
        """The step counts it can sample, for messages: "1-1000", "1-8" or "[1, 2, 4]"."""
        s = self.sampling
        if s.any_steps:
            return f"1-{s.max_steps}"
        return f"1-{MAX_STUDENT_STEPS}" if self._is_student else str(s.supported_steps())

    @property
    def _is_student(self) -> bool:
        return self.card is not None and self.card.role == "student"

    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        ids, mask = self.tokenizer.encode(list(prompts))
        return self.text_encoder(ids.to(self.device), mask.to(self.device))

    def velocity_fn(self, cond: TextCond, guidance: float):
        """v(x, t) with classifier-free guidance (Ho & Salimans 2022) folded in.

        A guidance-embedded student takes the scale as an input and runs once; otherwise, for a scale ≠ 1
        the conditional and unconditional ("" caption) passes run as one doubled batch.
        """
        tf = self.transformer
        b = cond.tokens.shape[0]
        if tf.cfg.guidance_embed:
            g = torch.full((b,), float(guidance), device=self.device)
            return lambda x, t: tf(x, t, cond.tokens, cond.mask, cond.pooled, guidance=g)
        if guidance == 1.0:
            return lambda x, t: tf(x, t, cond.tokens, cond.mask, cond.pooled)
        both = cond.cat(self.encode_text([""] * b))

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v_c, v_u = tf(torch.cat([x, x]), torch.cat([t, t]), *both.fields()).chunk(2)
            return v_u + guidance * (v_c - v_u)

        return guided

    @torch.no_grad()
    def generate_latents(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        cond: TextCond | None = None,
    ) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        steps = self.sampling.default_steps if steps is None else steps
        guidance = self.sampling.guidance if guidance is None else guidance
        grid = self.grid(steps)
        noise = seeded_noise(seeds, self.latent_shape, self.device)
        fn = self.velocity_fn(self.encode_text(prompts) if cond is None else cond, guidance)
        if self.sampling.sampler == "euler":
            return sample_euler(fn, noise, grid)
        return sample_x0(self.denoiser(fn), noise, grid, seeds)

    def inflight(self, steps: int | None = None, guidance: float | None = None):
        """A batch for ``steps`` sampled one step at a time, rows joining at step boundaries (models/inflight.py)."""
        from fewstep.models.inflight import InFlight

        return InFlight(self, self.sampling.default_steps if steps is None else steps, guidance)

    def denoiser(self, velocity_fn):
        """The x0 estimate the x0 sampler steps with: x − t·v, or the consistency function f(x, t)."""
        form = self.card.parameterization if self.card is not None else "velocity"
        if form != "velocity":
            s = self.sampling
            return lambda x, t: consistency_function(x, velocity_fn(x, t), t, s.sigma_data, s.boundary_scale, form)
        return velocity_denoiser(velocity_fn)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.autoencoder is None else self.autoencoder.decode(latents)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        size: tuple[int, int] | None = None,
        cond: TextCond | None = None,
    ) -> torch.Tensor:
        """-> images (B, 3, H, W) in [-1, 1] (clamped). Same (prompt, steps, seed) -> same image in any batch.

        ``size`` (width, height) must be the native size (``sizes``); ``cond``: the prompts already encoded by a
        model with the same ``encoder_key``."""
        if size is not None and (err := self.sizes.error(*size)):
            raise ValueError(err[1])
        return self.decode(self.generate_latents(prompts, seeds, steps, guidance, cond)).clamp(-1, 1)

    # ---- what the server asks of any served model (models/diffusers_model.py answers the same) ------------
    @property
    def sizes(self) -> Sizes:
        return Sizes.fixed(self.config.image_size, self.config.image_size)

    def encode(self, prompts: Sequence[str]) -> TextCond:
        return self.encode_text(prompts)

    @property
    def encoder_key(self) -> tuple | None:
        """Equal keys: identical tokenizer and text encoder weights, so one encoding serves both models."""
        if self.card is None:
            return None
        files = self.card.files
        return (files[TEXT_ENCODER].sha256, files[TOKENIZER].sha256, str(self.device))

    # ---- checkpoint I/O ---------------------------------------------------------------------------------
    def save(
        self, directory: str | Path, card: dict[str, Any], dtype: str = "float16", overwrite: bool = False
    ) -> Card:
        card = {**card, "model": self.config.to_dict()}
        self.card = save_checkpoint(
            directory, card, self.modules(), {TOKENIZER: self.tokenizer.to_json()}, dtype=dtype, overwrite=overwrite
        )
        return self.card

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", kernels: str = "auto") -> TextToImage:
        """kernels: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch"."""
        from fewstep.models.checkpoint import load_weights

        directory = Path(directory)
        card = read_card(directory)
        if card.role not in ("teacher", "student"):
            raise CheckpointError(f"{directory / 'card.json'}: role {card.role!r} is not a text-to-image model")
        if card.sampling is None:
            raise CheckpointError(f"{directory / 'card.json'}: sampling: missing for a {card.role}")
        try:
            config = ModelConfig.from_dict(with_legacy_defaults(card.model))
        except (TypeError, ValueError, ValidationError) as e:
            raise CheckpointError(f"{directory / 'card.json'}: model: {e}") from None
        tok_path = verify_file(directory, card, TOKENIZER)
        try:
            tokenizer = Tokenizer.load(tok_path)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{tok_path}: not a tokenizer file ({e})") from None
        try:
            model = cls.build(config, tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{directory / 'card.json'}: {e}") from None
        model.card, model.kernel_mode = card, kernels
        for name, module in model.modules().items():
            load_weights(directory, card, name, module)
        return model.to(device)

    def weights_sha256(self) -> str:
        """Identity of a saved model: sha256 of its transformer weights (students cite their teacher by it)."""
        if self.card is None:
            raise ValueError("the model has not been saved or loaded")
        return self.card.files[TRANSFORMER].sha256
