"""torchrun support: join the process group that torchrun describes in the environment, if any."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str = "auto") -> bool:
    """Initialise DDP when launched by torchrun (WORLD_SIZE > 1). nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
