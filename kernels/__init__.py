"""Triton kernels, each next to its torch reference, with dispatchers that use the reference on CPU."""
