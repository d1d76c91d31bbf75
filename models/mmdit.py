"""The Flux-style multimodal diffusion transformer: v = F(x_t, t, text[, guidance])."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from fewstep.models import graphs
from fewstep.models.config import TransformerConfig
from fewstep.models.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from fewstep.models.rope import position_ids, rope_tables


class MMDiT(graphs.GraphsOwner):
    graph_method = "_forward"  # inference as frozen graphs (use_graphs, models/graphs.py)

    def __init__(self, cfg: TransformerConfig, text_dim: int, latent_size: int):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"axes_dim {cfg.axes_dim} must sum to head_dim {cfg.head_dim}")
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not a multiple of patch size {cfg.patch_size}")
        self.cfg = cfg
        self.latent_size = latent_size
        p, dim = cfg.patch_size, cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels * p * p, dim)
        self.txt_in = nn.Linear(cfg.context_dim or text_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(cfg.pooled_dim or text_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm_eps) for _ in range(cfg.depth_double)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm_eps) for _ in range(cfg.depth_single)
        )
        self.final_layer = LastLayer(dim, p * p * cfg.in_channels)
        self._rope_cache: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        # the scale a guidance-embedded model runs at when a caller passes none: set for a FLUX.1-dev teacher (and the
        # students copied from it) in recipes that do not vary the scale (training/flux.py); never saved
        self.default_guidance: float | None = None

    @classmethod
    def from_state(cls, cfg: TransformerConfig, state: dict[str, torch.Tensor] | None = None, device="meta") -> MMDiT:
        """An MMDiT for ``cfg`` with its text widths set (context_dim, pooled_dim: a converted Flux, or a checkpoint's
        resolved config). Built on the meta device with ``state``, it holds state's tensors themselves: no second
        copy of a 12B model's weights."""
        with torch.device(device):
            model = cls(cfg, 0, 2 * cfg.patch_size)
        if state is not None:
            model.load_state_dict(state, assign=True, strict=True)
        return model

    @property
    def kernels(self) -> str:
        return self.final_layer.kernels

    def set_kernels(self, backend: str) -> MMDiT:
        """Route every block's attention, QK-norm+RoPE and modulation to "torch" or "triton" (resolved by
        kernels.runtime.resolve; the Triton path serves inference, autograd always takes the references)."""
        if backend not in ("torch", "triton"):
            raise ValueError(f"kernel backend must be 'torch' or 'triton', got {backend!r}")
        for m in self.modules():
            if isinstance(m, (DoubleStreamBlock, SingleStreamBlock, LastLayer)):
                m.kernels = backend
        return self

    def _rope(self, n_txt: int, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_txt, grid_h, grid_w, device)
        if key not in self._rope_cache:
            cos, sin = rope_tables(position_ids(n_txt, grid_h, grid_w), self.cfg.axes_dim, self.cfg.theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W) noisy latents
        t: torch.Tensor,  # (B,) in [0, 1]; 1 = pure noise
        txt: torch.Tensor,  # (B, Lt, context_dim) text-encoder tokens
        txt_mask: torch.Tensor | None,  # (B, Lt) bool, True = real token; None: attend to every token (Flux)
        pooled: torch.Tensor,  # (B, pooled_dim)
        guidance: torch.Tensor | None = None,  # (B,) CFG scale, for guidance-embedded students
        return_features: bool = False,  # also return the image tokens after every block (discriminators)
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if return_features or self.kernels != "torch":  # a graph holds PyTorch ops and returns one tensor
            return self._forward(x, t, txt, txt_mask, pooled, guidance, return_features)
        if guidance is None and self.guidance_in is not None and self.default_guidance is not None:
            guidance = torch.full((x.shape[0],), self.default_guidance, device=x.device)  # an input, not baked in
        return graphs.run(self.graphs, self._forward, x, t, txt, txt_mask, pooled, guidance)

    def _forward(self, x, t, txt, txt_mask, pooled, guidance=None, return_features=False):
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        img = rearrange(x, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=p, pw=p)  # Flux's 2×2 packing
        out = self.forward_tokens(img, (h, w), t, txt, txt_mask, pooled, guidance, return_features)
        v, features = out if return_features else (out, None)
        v = rearrange(v, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h, w=w, ph=p, pw=p)
        return (v, features) if return_features else v

    def forward_tokens(
        self,
        img: torch.Tensor,  # (B, h·w, C·p·p) packed latent patches, row-major (FluxPipeline's packed latents)
        grid: tuple[int, int],  # (h, w) patches
        t: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor | None,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer on packed tokens: what FluxTransformer2DModel computes (models/flux.py)."""
        # inputs in the weights' dtype: a bf16 teacher (a Flux pipeline on a GPU) called outside autocast with fp32
        # latents and text (block ranking, teacher samples) works; a no-op for fp32 models and under autocast
        dtype = self.img_in.weight.dtype
        img, txt, pooled = img.to(dtype), txt.to(dtype), pooled.to(dtype)
        img = self.img_in(img)  # (B, Li, D)
        vec = self.time_in(timestep_embedding(t, 256).to(img.dtype)) + self.vector_in(pooled)  # (B, D)
        if self.guidance_in is not None:
            if guidance is None and self.default_guidance is not None:
                guidance = torch.full((img.shape[0],), self.default_guidance, device=img.device)
            if guidance is None:
                raise ValueError("this model embeds the guidance scale: pass guidance")
            g = timestep_embedding(guidance, 256, time_factor=self.cfg.guidance_factor)
            vec = vec + self.guidance_in(g.to(img.dtype))
        txt = self.txt_in(txt)  # (B, Lt, D)
        n_txt = txt.shape[1]
        cos, sin = self._rope(n_txt, grid[0], grid[1], img.device)
        key_mask = None
        if txt_mask is not None:
            key_mask = torch.cat([txt_mask, txt_mask.new_ones(txt_mask.shape[0], img.shape[1])], dim=1)
        features: list[torch.Tensor] = []
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin, key_mask)
            features.append(img)
        xs = torch.cat([txt, img], dim=1)  # (B, Lt + Li, D)
        for block in self.single_blocks:
            xs = block(xs, vec, cos, sin, key_mask)
            features.append(xs[:, n_txt:])
        out = self.final_layer(xs[:, n_txt:], vec)  # (B, Li, p·p·C)
        return (out, features) if return_features else out
