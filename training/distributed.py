"""torchrun support: join the process group that torchrun describes in the environment, if any; shard a model with
FSDP2 and gather it back whole."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: str = "auto") -> bool:
    """Initialise DDP when launched by torchrun (WORLD_SIZE > 1). nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def rank() -> int:
    """This process's rank under torchrun, 0 otherwise."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def fully_shard_model(module: nn.Module, device: torch.device) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) in place: each transformer block its own unit (its weights
    gathered just before it runs and freed after), then the rest. On CUDA parameters are gathered in bf16 and
    gradients reduced in fp32 (the sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fewstep.models.layers import DoubleStreamBlock, SingleStreamBlock

    kw: dict[str, Any] = {}
    if device.type == "cuda":
        # inputs keep their dtype (t, noise, guidance in fp32, as under DDP's autocast); the model casts what it needs
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for m in list(module.modules()):
        if isinstance(m, (DoubleStreamBlock, SingleStreamBlock)):
            fully_shard(m, **kw)
    fully_shard(module, **kw)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded module, on the CPU (every rank must call it: it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


def unsharded(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module (``template``: a copy on the meta device taken before sharding) holding ``state``."""
    plain = copy.deepcopy(template)
    plain.load_state_dict(state, assign=True, strict=True)
    return plain


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
