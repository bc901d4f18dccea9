"""Wrappers, fake kernels and autograd for the route op family (being implemented)."""

__all__: list = []
