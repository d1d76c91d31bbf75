"""Tiny random-weight diffusers pipelines written to disk, offline, for tests.

Everything is built from configs (no model hub): the tokenizers from vocabularies written here, the models from
small configs seeded with ``torch.manual_seed`` so that a build is deterministic.

- :func:`build_flux_pair` writes a FLUX.1-schnell-like student and a FLUX.1-dev-like teacher (guidance embedding)
  that share the very same text encoders, tokenizers, VAE and scheduler objects, so those files are byte-identical.
  Images must have a side divisible by 4 (VAE factor 2 × 2×2 packing): 32×32 → 16×16×4 latents → 8×8 tokens.
- :func:`build_sdxl_turbo` writes an SDXL-Turbo-like pipeline (UNet, Euler ancestral with trailing timesteps);
  it generates 32×32 images (side divisible by 4: VAE factor 2, one UNet downsample), e.g. with
  ``num_inference_steps=1, guidance_scale=0.0``.
- :func:`write_spec` writes a ``fewstep.json`` next to a pipeline.

Run ``python -m tests.tiny_pipelines`` to build all three into a temporary folder and try them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

CLIP_VOCAB_SIZE = 1000
T5_VOCAB_SIZE = 256
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# Whole-word entries so that common prompt words become one token; any other text falls back to single characters.
_WORD_TEXT = """
a an the of on in with and photo picture painting portrait digit number zero one two three four five six seven
eight nine red green blue black white yellow orange purple gray cat dog car tree house city sky sea sunset
mountain flower background
"""
WORDS = tuple(_WORD_TEXT.split())


def _seeded(seed: int, build: Any, *, rescale: bool = False) -> Any:
    """Build a module right after ``torch.manual_seed(seed)``, in eval mode.

    With ``rescale``, every Linear/Conv2d weight is redrawn from N(0, 1/fan_in) (biases N(0, 0.02²)). PyTorch's
    default init shrinks activations by about √3 per layer, which in these tiny denoisers leaves the adaLN/time
    modulation and the text paths nearly inert: images then barely depend on the prompt or the guidance scale.
    """
    torch.manual_seed(seed)
    module = build()
    if rescale:
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
                if layer.bias is not None:
                    torch.nn.init.normal_(layer.bias, std=0.02)
    return module.eval()


def build_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level BPE CLIPTokenizer from a vocab.json + merges.txt written into ``folder``.

    The vocabulary holds every byte character alone and with "</w>" (so any text tokenizes), the merges that spell
    out :data:`WORDS`, and the two special tokens last (as in CLIP, where "<|endoftext|>" has the highest id).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            parts = [parts[0] + parts[1], *parts[2:]]
            if merge not in merges:
                merges.append(merge)
                tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    assert len(vocab) <= CLIP_VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH, local_files_only=True)


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5TokenizerFast over a `tokenizers` Unigram model: <pad>=0, </s>=1, <unk>=2, then characters and words."""
    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in WORDS]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -10.0) for c in chars]
    assert len(pieces) <= T5_VOCAB_SIZE, len(pieces)
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=T5_MAX_LENGTH,
    )


def _clip_config(tokenizer: CLIPTokenizer, *, hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(channels: tuple[int, int], *, scaling_factor: float, shift_factor: float | None) -> AutoencoderKL:
    """A two-block AutoencoderKL: 4 latent channels at half the image resolution."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flux_transformer(*, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


def build_flux_pair(root: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/"flux-student"`` (schnell-like) and ``root/"flux-teacher"`` (dev-like); return both folders.

    Only the transformers differ (different weights; the teacher has ``guidance_embeds=True``); every other component
    is the same object saved twice.
    """
    root = Path(root)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = _seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer)))
    t5_config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder_2 = _seeded(seed + 1, lambda: T5EncoderModel(t5_config))
    vae = _seeded(seed + 2, lambda: _vae((8, 16), scaling_factor=1.5035, shift_factor=0.0609))
    # FLUX.1-dev's scheduler_config (shift is unused once dynamic shifting is on).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    shared = dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    folders = []
    for name, offset, guidance in (("flux-student", 3, False), ("flux-teacher", 4, True)):
        transformer = _seeded(seed + offset, lambda g=guidance: _flux_transformer(guidance_embeds=g), rescale=True)
        folder = root / name
        FluxPipeline(transformer=transformer, **shared).save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def build_sdxl_turbo(root: Path, *, seed: int = 0) -> Path:
    """Write ``root/"sdxl-turbo"``: a tiny SDXL-Turbo-like pipeline that makes 32×32 images; return the folder.

    Loads with ``AutoPipelineForText2Image.from_pretrained``; use ``num_inference_steps=1, guidance_scale=0.0``.
    """
    folder = Path(root) / "sdxl-turbo"
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    text_encoder = _seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer)))
    text_encoder_2 = _seeded(seed + 1, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer)))
    unet = _seeded(
        seed + 2,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,  # diffusers' tests use 2 (and 2 transformer layers below): 8 MB instead of 4
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=1,
            cross_attention_dim=64,  # the two text encoders' hidden states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + pooled text projection
            norm_num_groups=1,
        ),
        rescale=True,
    )
    vae = _seeded(seed + 3, lambda: _vae((8, 16), scaling_factor=0.13025, shift_factor=None))
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="trailing",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def write_spec(folder: Path, **fields: Any) -> Path:
    """Write ``folder/"fewstep.json"`` (indent 2) from ``fields``; return its path."""
    path = Path(folder) / "fewstep.json"
    path.write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    import time

    from diffusers import AutoPipelineForText2Image

    def show(folder: Path, pipe: Any, **call: Any) -> None:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        print(f"{folder.name}: {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")
        for p in files:
            print(f"  {p.relative_to(folder)} ({p.stat().st_size} B)")
        images = [
            pipe(prompt=prompt, height=32, width=32, output_type="np", generator=torch.manual_seed(0), **call).images
            for prompt in ("a red 7 on black", "a blue cat")
        ]
        diff = abs(images[0] - images[1]).max()
        print(f"  images {images[0].shape}, std {images[0].std():.3f}, two prompts differ by up to {diff:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        student, teacher = build_flux_pair(Path(tmp))
        print(f"build_flux_pair: {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        sdxl = build_sdxl_turbo(Path(tmp))
        print(f"build_sdxl_turbo: {time.perf_counter() - start:.2f} s")
        show(student, FluxPipeline.from_pretrained(student), num_inference_steps=2, guidance_scale=0.0)
        show(teacher, FluxPipeline.from_pretrained(teacher), num_inference_steps=4, guidance_scale=3.5)
        show(sdxl, AutoPipelineForText2Image.from_pretrained(sdxl), num_inference_steps=1, guidance_scale=0.0)
