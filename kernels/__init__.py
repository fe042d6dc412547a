"""Triton kernels, installed as `fastcls.kernels` (one module per op)."""
