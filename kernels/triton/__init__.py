"""Triton kernels, one module per family. Imported lazily by fastreg.ops."""
