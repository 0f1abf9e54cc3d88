"""Evaluation: sample sets and files (ADM .npz), reference statistics, and FID/sFID/IS/precision/recall/KID
through torch-fidelity's feature extractors with ADM's conventions."""

from .fidelity import FeatureSpec, Featurizer, MetricOptions, compute_metrics
from .images import load_npz, save_grid, save_npz, to_uint8
from .reference import Reference, compute_reference
from .sample_set import SampleSet, SamplingOptions

__all__ = [
    "FeatureSpec",
    "Featurizer",
    "MetricOptions",
    "Reference",
    "SampleSet",
    "SamplingOptions",
    "compute_metrics",
    "compute_reference",
    "load_npz",
    "save_grid",
    "save_npz",
    "to_uint8",
]
