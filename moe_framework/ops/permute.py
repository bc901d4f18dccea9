"""Wrappers, fake kernels and autograd for the permute op family (being implemented)."""

__all__: list = []
