"""Wrappers, fake kernels and autograd for the grouped_gemm op family (being implemented)."""

__all__: list = []
