"""Compression by block removal and knowledge distillation (the thesis's aim; BK-SDM, Flux.1 Lite, Flux-Mini):
rank the transformer's blocks (importance.py), remove the least important (prune.py), and train the smaller
model back with the task loss plus output and feature KD from the full model (losses.py, recipe.py)."""
