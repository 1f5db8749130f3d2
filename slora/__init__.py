"""slora: a reference implementation of Sensitivity-LoRA (arXiv 2509.09119)."""

__version__ = "0.1.0"
