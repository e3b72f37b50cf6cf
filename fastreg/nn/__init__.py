"""Modules built on fastreg ops (one module file per family)."""
