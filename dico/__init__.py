"""dico: train, evaluate and ablate DiCo (Diffusion ConvNet) and its DiT baselines with Lightning."""

__version__ = "0.1.0"
