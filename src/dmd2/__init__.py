"""dmd2: a reproducible DMD2 diffusion-distillation pipeline."""

__version__ = "0.1.0"
