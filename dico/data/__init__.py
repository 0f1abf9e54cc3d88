"""Data: latent extraction (VAE), latent shards + manifest, samplers and LightningDataModules.

Never imports ``dico.models``, ``dico.diffusion`` or ``dico.evaluation`` (it is the floor below them).
"""

from .datamodule import ArrayDataModule, DigitsDataModule, LatentDataModule, load_digits_arrays
from .extract import ExtractConfig, center_crop_arr, extract_latents, list_image_folder
from .image_crops import ImageCropsDataModule, image_crops
from .latents import InMemoryLatents, ShardedLatents
from .manifest import Manifest
from .sampler import EpochSampler

__all__ = [
    "ArrayDataModule",
    "DigitsDataModule",
    "EpochSampler",
    "ExtractConfig",
    "ImageCropsDataModule",
    "InMemoryLatents",
    "LatentDataModule",
    "Manifest",
    "ShardedLatents",
    "center_crop_arr",
    "extract_latents",
    "image_crops",
    "list_image_folder",
    "load_digits_arrays",
]
