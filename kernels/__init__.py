"""Kernels (installed as clpt_kernels)."""
