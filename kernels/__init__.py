"""Triton kernels of fasttrain, installed as ``fasttrain.kernels``."""
