"""Optimizers built on fastreg kernels."""
