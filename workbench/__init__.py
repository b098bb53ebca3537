"""Compression Workbench: see where a transformer LM is redundant, compress it by clicking."""

__version__ = "0.1.0"
