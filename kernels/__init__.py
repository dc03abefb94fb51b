"""Kernels: Triton kernels with their plain-PyTorch twins."""
