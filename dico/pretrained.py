"""Released checkpoints: a catalogue of the published weights and figures, where a file comes from (the Hugging
Face Hub cache, a download cache, or a local path), what it is (format, EMA or not, architecture), and a
:class:`~dico.module.DiffusionModule` built from it.

Every file loads with ``torch.load(weights_only=True)``; the published training checkpoints keep their argparse
options in ``"args"``, so ``argparse.Namespace`` (plain attributes only) is the one class allowed besides tensors.
Full unpickling needs the explicit ``unsafe_full_unpickle`` opt-in.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dico.models.info import VAE_DOWNSAMPLING
from dico.models.official import (
    LIGHTNING,
    STATE_DICT,
    TRAINING,
    _published_dit_heads,
    checkpoint_format,
    convert_official_state_dict,
    infer_arch,
    infer_config,
    load_converted,
    registered_name,
)

if TYPE_CHECKING:
    from dico.module import DiffusionModule

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
}  # fmt: skip


class WeightsNotFoundError(FileNotFoundError):
    """A released checkpoint is neither cached nor downloadable; the message holds the download command."""


def find_release(name_or_path: str | Path | None) -> Release | None:
    """The catalogue entry of a release name (``DiCo-XL-3750K``) or of a file named as released."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    if text in CATALOGUE:
        return CATALOGUE[text]
    base = Path(text).name
    return next((r for r in CATALOGUE.values() if base in (r.filename, Path(r.filename).stem)), None)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


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
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise WeightsNotFoundError(
            f"{release.filename} ({release.name}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}. Download it once on a machine with a network (same HF_HOME): "
            f"`{release.download_command()}`, or pass the file with --ckpt PATH."
        ) from None


def _from_url(release: Release) -> Path:
    dest = Path(torch.hub.get_dir()) / "checkpoints" / release.filename
    if dest.is_file():
        return dest
    command = release.download_command(dest)
    if _offline():
        raise WeightsNotFoundError(
            f"{release.filename} ({release.name}) is not at {dest} and HF_HUB_OFFLINE is set. Download it once: "
            f"`{command}`, or pass the file with --ckpt PATH."
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
    if Path(vae).expanduser().exists() or not _offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(vae, "config.json"), str):
        raise WeightsNotFoundError(
            f"the VAE {vae} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set. "
            f"Download it once: `hf download {vae}`, or pass a local copy (a `save_pretrained` folder) with {option}."
        )


def read_checkpoint(path: str | Path, unsafe_full_unpickle: bool = False) -> Mapping[str, Any]:
    """``torch.load`` on the CPU, memory-mapped where the file allows, ``weights_only`` unless told otherwise.

    A file torch cannot read (truncated, empty, not a checkpoint) raises a ``ValueError`` that says so."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    mmap = zipfile.is_zipfile(path)
    try:
        if unsafe_full_unpickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = [line for line in str(e).splitlines() if "Unsupported global" in line]
        if not refused:  # not a class safe loading refuses: bytes that are no pickle at all
            raise unreadable_checkpoint(path, e) from e
        reason = refused[0].strip()[:300]
        raise RuntimeError(
            f"{path} holds objects that safe loading refuses ({reason}). If you trust the file, pass "
            "--unsafe_full_unpickle true (full unpickling can run arbitrary code)."
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise unreadable_checkpoint(path, e) from e


def unreadable_checkpoint(path: str | Path, error: BaseException) -> ValueError:
    noise = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(noise)]
    reason = (lines or [""])[0].split(". ")[0][:160]
    return ValueError(
        f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}): the file is truncated, corrupt "
        f"or not a torch checkpoint. Pass another file, e.g. an earlier checkpoint in {Path(path).resolve().parent}."
    )


@dataclass
class LoadedWeights:
    """What a checkpoint file is and which of its weights were taken.

    ``state_dict`` holds the chosen weights under the published key names (under ours for ``lightning``);
    ``training_state_dict`` the non-EMA weights of a training checkpoint when the EMA ones were chosen.
    """

    path: Path
    release: Release | None
    format: str
    arch: str  # dico | dit (published key names) | ours
    weights: str
    model: str
    model_kwargs: dict[str, Any]
    state_dict: Mapping[str, Tensor] = field(repr=False)
    training_state_dict: Mapping[str, Tensor] | None = field(default=None, repr=False)

    def describe(self) -> str:
        kinds = {
            LIGHTNING: "a dico Lightning checkpoint",
            TRAINING: f"a published {self.arch_name} training checkpoint {{model, ema, opt, args}}",
            STATE_DICT: f"a published {self.arch_name} state dict",
        }
        size = self.model_kwargs.get("input_size")
        shape = f", {size}x{size} latents" if size else ""
        released = f" (release {self.release.name})" if self.release else ""
        kwargs = f" {self.model_kwargs}" if self.model_kwargs else ""
        line = f"{self.path.name}{released}: {kinds[self.format]}, {self.weights} -> {self.model}{kwargs}{shape}"
        if self.release is not None and self.format != LIGHTNING and self.model != self.release.model:
            line += f" (not the release's {self.release.model} architecture: another file of the same name?)"
        return line

    @property
    def arch_name(self) -> str:
        return {"dico": "DiCo", "dit": "DiT"}.get(self.arch, self.arch)


def inspect_checkpoint(
    source: str,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    image_size: int | None = None,
    use_ema: bool = True,
    unsafe_full_unpickle: bool = False,
) -> LoadedWeights:
    """Resolve ``source`` (path or release name), read it and tell what it is.

    The architecture comes from the keys and shapes (``model`` names it instead; ``model_kwargs`` override any
    argument). What the weights cannot tell comes from the release, the training checkpoint's ``args`` or
    ``image_size``: DiCo's latent size (``image_size / 8``, 256x256 images by default) and DiT's head count
    (the published sizes' counts).
    """
    path, release = resolve(source)
    checkpoint = read_checkpoint(path, unsafe_full_unpickle)
    fmt = checkpoint_format(checkpoint)
    if fmt == LIGHTNING:
        hp = dict(checkpoint.get("hyper_parameters", {}))
        return LoadedWeights(path, release or find_release(hp.get("pretrained")), fmt, "ours",
                             "the weights in its state_dict (EMA when trained with the EMA callback)",
                             hp.get("model", "?"), dict(hp.get("model_kwargs") or {}),
                             checkpoint["state_dict"])  # fmt: skip
    args = None
    if fmt == TRAINING:
        args = checkpoint.get("args")  # the published scripts' argparse options (image_size, model)
        chosen = "ema" if use_ema and "ema" in checkpoint else "model"
        weights = "EMA weights" if chosen == "ema" else "non-EMA (model) weights"
        state_dict = checkpoint[chosen]
        training = checkpoint.get("model") if chosen == "ema" else None
    else:
        weights, state_dict, training = "the released (EMA) weights", checkpoint, None
    arch = infer_arch(state_dict)
    name, overrides = _architecture(state_dict, arch, release, args, model, model_kwargs or {}, image_size)
    return LoadedWeights(path, release, fmt, arch, weights, name, overrides, state_dict, training)


def _architecture(
    state_dict: Mapping[str, Tensor],
    arch: str,
    release: Release | None,
    args: Any,
    model: str | None,
    model_kwargs: dict[str, Any],
    image_size: int | None,
) -> tuple[str, dict[str, Any]]:
    config = infer_config(state_dict, arch)
    size = image_size or (release.image_size if release else None) or getattr(args, "image_size", None) or 256
    if "input_size" not in config:  # a ConvNet's weights do not fix its input size
        config["input_size"] = size // VAE_DOWNSAMPLING
    if model is not None:  # the named architecture, with the I/O the weights have
        io = ("input_size", "in_channels", "learn_sigma", "num_classes")
        return model, {**{k: config[k] for k in io}, **model_kwargs}
    if arch == "dit" and "num_heads" not in model_kwargs:
        try:
            config["num_heads"] = _published_dit_heads(config["hidden_size"])
        except ValueError:
            raise ValueError(
                f"a DiT of width {config['hidden_size']} is no published size and its weights do not tell the head "
                "count: pass --model_kwargs '{\"num_heads\": N}' (or --model NAME)"
            ) from None
    name, overrides = registered_name(arch, {**config, **model_kwargs})
    return name, overrides


def load_weights(model: nn.Module, loaded: LoadedWeights, configured: str = "the configured model") -> None:
    """Put ``loaded``'s weights into our backbone ``model`` (strict); a mismatch names the weights' architecture."""
    if loaded.format == LIGHTNING:
        ours = {k.removeprefix("model."): v for k, v in loaded.state_dict.items() if k.startswith("model.")}
        model.load_state_dict(ours)
        return
    try:
        load_converted(model, loaded.state_dict, loaded.arch)
    except (KeyError, ValueError) as e:
        try:
            name, kwargs = _architecture(loaded.state_dict, loaded.arch, loaded.release, None, None, {}, None)
            weights_are = f"the weights are {name} {kwargs}; set model.model / model.model_kwargs to that"
        except ValueError:
            weights_are = "set model.model / model.model_kwargs to the architecture of the weights"
        raise ValueError(f"{loaded.path.name} does not fit {configured}: {weights_are} ({e})") from e


def apply_pretrained(module: DiffusionModule, source: str, use_ema: bool = True) -> LoadedWeights:
    """``DiffusionModule(pretrained=...)``: the module's model gets the EMA weights (what sampling and the test
    protocol use); a training checkpoint's non-EMA weights wait in ``module._training_weights`` until fit starts,
    so that fine-tuning continues from both (the EMA callback copies the model before the module's setup)."""
    hp = module.hparams
    loaded = inspect_checkpoint(source, hp.model, use_ema=use_ema)
    load_weights(module.model, loaded, f"the configured model {hp.model} {hp.model_kwargs or ''}")
    if loaded.training_state_dict is not None:
        module._training_weights = convert_official_state_dict(loaded.training_state_dict, loaded.arch)
    module.weights_source = loaded
    return loaded


def load_for_sampling(
    source: str,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    image_size: int | None = None,
    vae: str | None = None,
    use_ema: bool = True,
    unsafe_full_unpickle: bool = False,
) -> DiffusionModule:
    """A :class:`DiffusionModule` holding the weights of ``source`` (a path or a release name) in any published
    format, ready to sample: the release's guidance scale, 250-step iDDPM, samples decoded through ``vae`` (the
    SD VAE the models were trained with by default; a local folder works offline). ``module.weights_source``
    says what was loaded."""
    from dico.module import DiffusionModule

    loaded = inspect_checkpoint(source, model, model_kwargs, image_size, use_ema, unsafe_full_unpickle)
    if loaded.format == LIGHTNING:
        module = DiffusionModule.load_from_checkpoint(
            loaded.path, map_location="cpu", weights_only=not unsafe_full_unpickle, pretrained=None
        )
        if vae is not None and module.decoder_spec.get("kind") == "vae":
            module.decoder_spec = {**module.decoder_spec, "vae": vae}
    else:
        check_vae_available(vae or SD_VAE)
        decoder = {"kind": "vae", "vae": vae or SD_VAE, "scale_factor": SD_SCALE_FACTOR}
        cfg = loaded.release.cfg_scale if loaded.release else 1.0
        module = DiffusionModule(loaded.model, loaded.model_kwargs, cfg_scale=cfg, decoder=decoder)
        load_weights(module.model, loaded, loaded.model)
    if module.decoder_spec.get("kind") == "vae":
        check_vae_available(module.decoder_spec["vae"])
    module.weights_source = loaded
    return module.eval()


def checkpoint_info(
    source: str,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    image_size: int | None = None,
    use_ema: bool = True,
    unsafe_full_unpickle: bool = False,
    macs: bool = True,
) -> dict[str, Any]:
    """``model-info`` of a checkpoint: what the file is, the architecture its weights load into (checked by
    loading them), parameters, Gflops, shapes, and the published figures of a release."""
    from dico.models import create_model
    from dico.profiling import count_macs, count_parameters

    loaded = inspect_checkpoint(source, model, model_kwargs, image_size, use_ema, unsafe_full_unpickle)
    net = create_model(loaded.model, **loaded.model_kwargs)
    load_weights(net, loaded, loaded.model)
    latent = net.input_size
    info: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "format": loaded.format,
        "weights": loaded.weights,
        "loaded": loaded.describe(),
        "model": loaded.model,
        "model_kwargs": loaded.model_kwargs,
        "image_size": latent * VAE_DOWNSAMPLING,
        "input_shape": [net.in_channels, latent, latent],
        "output_shape": [net.out_channels, latent, latent],
        "num_classes": net.num_classes,
        "params": count_parameters(net),
        "params_M": round(count_parameters(net) / 1e6, 2),
    }
    if macs:
        info["gmacs"] = round(count_macs(net, latent, net.in_channels) / 1e9, 3)
    if loaded.release is not None:
        r = loaded.release
        info["release"] = r.name
        info["published"] = {"cfg_scale": r.cfg_scale, "fid": r.fid, "inception_score": r.inception_score,
                             "source": r.source}  # fmt: skip
    return info


def released_ckpt_path_to_model(module: DiffusionModule, ckpt_path: str | None) -> str | None:
    """``test --ckpt_path FILE_OR_RELEASE`` with a published (non-Lightning) file or a release name: load it into
    ``module`` as ``pretrained`` would and return None (nothing left for Lightning to restore); any other
    ``ckpt_path`` (``last``, a Lightning checkpoint) comes back as it was."""
    if not ckpt_path or (ckpt_path not in CATALOGUE and not Path(ckpt_path).is_file()):
        return ckpt_path
    if ckpt_path not in CATALOGUE:
        try:
            if checkpoint_format(read_checkpoint(ckpt_path)) == LIGHTNING:
                return ckpt_path
        except (RuntimeError, ValueError):
            return ckpt_path  # let Lightning load it and report
    loaded = apply_pretrained(module, ckpt_path)
    module._training_weights = None
    print(f"[dico] {loaded.describe()}")
    return None
