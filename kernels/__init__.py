"""Compiled kernels (installed as fastreg.kernels): triton/<family>.py and numba/<family>.py."""
