"""Fused kernels used by the model family, each beside the PyTorch reference that defines it.

The model calls them only through ``models/ops.py``.
"""
