"""Evaluation: sample files (ADM .npz), grids, and FID/IS/precision/recall through torch-fidelity."""

from .images import load_npz, save_grid, save_npz, to_uint8

__all__ = ["load_npz", "save_grid", "save_npz", "to_uint8"]
