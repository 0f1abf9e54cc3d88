"""Released checkpoints: a catalogue of the published weights and figures, where a release's file comes from (the
Hugging Face Hub cache, a download cache, or a local path), and our figures beside the published ones.

It builds nothing: what a file holds and loading it are :mod:`dico.checkpoints`; a module built from a release to
sample from is :func:`dico.sample_jobs.load_for_sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dico.runtime import hub_offline

SD_VAE = "stabilityai/sd-vae-ft-ema"  # every released DiCo and DiT model was trained and scored with it
SD_SCALE_FACTOR = 0.18215


@dataclass(frozen=True)
class Release:
    """A published checkpoint and the figures published for it (FID-50K against ADM's reference batch, 250-step
    iDDPM, guidance on the first three channels as the published sampler does)."""

    name: str
    model: str  # our registered architecture
    image_size: int
    filename: str
    repo_id: str | None = None  # on the Hugging Face Hub
    url: str | None = None  # a direct download (DiT's released files are not on the hub)
    cfg_scale: float = 1.0
    fid: float | None = None
    inception_score: float | None = None
    source: str = ""  # where the figures are published

    def download_command(self, dest: Path | None = None) -> str:
        if self.repo_id:
            return f"hf download {self.repo_id} {self.filename}"
        return f"curl -L --create-dirs -o {dest or self.filename} {self.url}"


_DICO_README = "shallowdream204/DiCo README and the paper's Table 1"
_DIT_PAPER = "DiT paper (Peebles & Xie), Tables 4 and 2, as the DiCo paper quotes them"
CATALOGUE: dict[str, Release] = {
    r.name: r
    for r in [
        Release("DiCo-S-400K", "DiCo-S", 256, "DiCo-S-400K-256x256.pt", "shallowdream204/DiCo", None, 1.0, 49.97, 31.38,
                _DICO_README),
        Release("DiCo-B-400K", "DiCo-B", 256, "DiCo-B-400K-256x256.pt", "shallowdream204/DiCo", None, 1.0, 27.20, 56.52,
                _DICO_README),
        Release("DiCo-L-400K", "DiCo-L", 256, "DiCo-L-400K-256x256.pt", "shallowdream204/DiCo", None, 1.0, 13.66, 91.37,
                _DICO_README),
        Release("DiCo-XL-400K", "DiCo-XL", 256, "DiCo-XL-400K-256x256.pt", "shallowdream204/DiCo", None, 1.0, 11.67,
                100.42, _DICO_README),
        Release("DiCo-XL-3750K", "DiCo-XL", 256, "DiCo-XL-3750K-256x256.pt", "shallowdream204/DiCo", None, 1.4, 2.05,
                282.17, _DICO_README),
        Release("DiT-XL-2-256", "DiT-XL/2", 256, "DiT-XL-2-256x256.pt", None,
                "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", 1.5, 2.27, 278.24, _DIT_PAPER),
        Release("DiT-XL-2-512", "DiT-XL/2", 512, "DiT-XL-2-512x512.pt", None,
                "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", 1.5, 3.04, 240.82, _DIT_PAPER),
    ]
}  # fmt: skip  # table: one release per entry, fields in Release's order


class WeightsNotFoundError(FileNotFoundError):
    """A released checkpoint is neither cached nor downloadable; the message holds the download command and, where
    ``option`` is set, the option that takes the file instead (the caller that knows it may change it)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.message, self.option = message, option

    def __str__(self) -> str:
        return self.message + (f", or pass the file with {self.option}." if self.option else "")


def find_release(name_or_path: str | Path | None) -> Release | None:
    """The catalogue entry of a release name (``DiCo-XL-3750K``) or of a file named as released."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    if text in CATALOGUE:
        return CATALOGUE[text]
    base = Path(text).name
    return next((r for r in CATALOGUE.values() if base in (r.filename, Path(r.filename).stem)), None)


def resolve(source: str) -> tuple[Path, Release | None]:
    """A local file, or a release name fetched through its cache: the Hugging Face Hub cache (``HF_HOME``,
    ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` as huggingface_hub reads them) or, for URL releases, torch.hub's
    ``checkpoints/`` folder (``TORCH_HOME``). Raises :class:`WeightsNotFoundError` with the download command."""
    path = Path(source).expanduser()
    if path.is_file():
        return path, find_release(path)
    release = CATALOGUE.get(source)
    if release is None:
        raise FileNotFoundError(
            f"{source!r} is neither a file nor a released checkpoint; known releases: {', '.join(CATALOGUE)}"
        )
    return (_from_hub(release) if release.repo_id else _from_url(release)), release


def _from_hub(release: Release) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(release.repo_id, release.filename))  # type: ignore[arg-type]
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not be reached"
        raise WeightsNotFoundError(
            f"{release.filename} ({release.name}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}. Download it once on a machine with a network (same HF_HOME): "
            f"`{release.download_command()}`",
            "--ckpt PATH",
        ) from None


def _from_url(release: Release) -> Path:
    dest = Path(torch.hub.get_dir()) / "checkpoints" / release.filename
    if dest.is_file():
        return dest
    command = release.download_command(dest)
    if hub_offline():
        raise WeightsNotFoundError(
            f"{release.filename} ({release.name}) is not at {dest} and HF_HUB_OFFLINE is set. Download it once: "
            f"`{command}`",
            "--ckpt PATH",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(release.url, str(dest))  # type: ignore[arg-type]
    except OSError as e:
        raise WeightsNotFoundError(f"downloading {release.url} failed ({e}); download it with `{command}`") from None
    return dest


def check_vae_available(vae: str, option: str = "--vae PATH") -> None:
    """Fail before sampling, not after the first batch, when the VAE cannot be loaded offline; ``option`` is how
    the caller's command takes a local copy."""
    if Path(vae).expanduser().exists() or not hub_offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(vae, "config.json"), str):
        raise WeightsNotFoundError(
            f"the VAE {vae} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set. "
            f"Download it once: `hf download {vae}`, or pass a local copy (a `save_pretrained` folder) with {option}."
        )
