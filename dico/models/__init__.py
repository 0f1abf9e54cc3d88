"""Backbones: DiCo (U-shaped ConvNet), DiT baselines and the isotropic skeleton they share with "DiCo (iso.)",
their parts (token mixers, channel attentions), the ablation variants of Tables 3-4 (:mod:`.ablation`) and the
published checkpoints' key names (:mod:`.official`; files of any format load through :mod:`dico.checkpoints`).

Pure torch: nothing here imports Lightning, the diffusion package, wandb or torch-fidelity.
"""

from . import ablation, attention, channel_attention, mixers  # noqa: F401  (register the parts and variants)
from .base import DiffusionBackbone
from .dico import DICO_CONFIGS, DiCo
from .dit import DIT_CONFIGS, DiT
from .isotropic import IsotropicBackbone, IsotropicDiCo
from .official import convert_official_state_dict, published_model
from .registry import CHANNEL_ATTENTION, MODELS, TOKEN_MIXERS, create_model, list_models, register_model

__all__ = [
    "CHANNEL_ATTENTION",
    "DICO_CONFIGS",
    "DIT_CONFIGS",
    "MODELS",
    "TOKEN_MIXERS",
    "DiCo",
    "DiT",
    "DiffusionBackbone",
    "IsotropicBackbone",
    "IsotropicDiCo",
    "convert_official_state_dict",
    "create_model",
    "list_models",
    "published_model",
    "register_model",
]
