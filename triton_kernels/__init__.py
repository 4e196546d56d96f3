"""Triton kernels of bandadv, shipped as bandadv.triton_kernels."""
