"""Wrappers, fake kernels and autograd for the similarity op family (being implemented)."""

__all__: list = []
