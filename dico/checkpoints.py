"""Checkpoint files, the one home of their formats: what a file is and the weights in it, read safely; written
atomically.

Reading: every file loads through :func:`read_checkpoint`, ``torch.load(weights_only=True)``; the published training
checkpoints keep their argparse options in ``"args"``, so ``argparse.Namespace`` (plain attributes only) is the one
class allowed besides tensors. Full unpickling needs the explicit ``unsafe_full_unpickle`` opt-in. A file is a dico
Lightning checkpoint, a published training checkpoint or a published state dict (:func:`checkpoint_format`); a
training checkpoint unwraps to its EMA or live weights (:func:`unwrap_training_checkpoint`); the architecture is read
off the keys and shapes, whose published names only :mod:`dico.models.official` knows. Release names resolve through
:mod:`dico.pretrained`.

Writing: Lightning's default writer stages the file in ``$TMPDIR`` and moves it into place; across filesystems the
move is a copy over the old checkpoint, so a job killed during it leaves a truncated ``last.ckpt`` (and the staged
copy in ``$TMPDIR``). :class:`AtomicCheckpointIO` writes a temporary file next to the target, fsyncs it and
``os.replace``-s it over the target: a reader sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dico.divergence import weights_are_sound
from dico.models.info import VAE_DOWNSAMPLING
from dico.models.official import (
    convert_official_state_dict,
    infer_arch,
    infer_config,
    load_converted,
    published_dit_heads,
    published_model,
    registered_name,
    rename_pre_shared_block_keys,
)
from dico.pretrained import CATALOGUE, Release, WeightsNotFoundError, find_release, resolve


# ---------------------------------------------------------------------------------------------------- reading
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
        # a global safe loading does not allow, or a call to one (os.system): refused, not corrupt
        refused = [line for line in str(e).splitlines() if "GLOBAL " in line or "Trying to call reduce" in line]
        if not refused:  # not a class safe loading refuses: bytes that are no pickle at all
            raise unreadable_checkpoint(path, e) from e
        reason = refused[0].strip()[:300]
        raise ValueError(
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


def newest_sound_checkpoint(paths: list[Path], max_abs_weight: float) -> Path | None:
    """The newest of ``paths`` that reads and whose live and EMA weights are all sound (finite, within
    ``max_abs_weight``; 0: finiteness only). Checkpoints are memory-mapped."""
    for path in sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = read_checkpoint(path)
        except (ValueError, RuntimeError, OSError):  # a truncated or foreign file is not a checkpoint to resume from
            continue
        states = [ckpt.get("state_dict", {}), ckpt.get("current_model_state", {})]
        if all(weights_are_sound(s, max_abs_weight) for s in states):
            return path
    return None


def resume_checkpoint(ckpt_path: str | Path | None, folders: list[Path], max_abs_weight: float = 0.0) -> str | None:
    """``fit --ckpt_path``, resolved and read (``weights_only``) before anything is written: ``last`` becomes the newest
    ``last*.ckpt`` in ``folders`` (the checkpoint callbacks' folders; it stays ``last`` when there is none, and the run
    starts afresh), a path must be a dico Lightning checkpoint. A damaged file raises a ValueError naming the newest
    sound checkpoint in its folder to resume from, so that a requeue loop stops instead of retrying it."""
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc", "registry") or get_protocol(str(ckpt_path)) != "file":
        return None if ckpt_path is None else str(ckpt_path)  # Lightning's own lookups and remote files
    if str(ckpt_path) == "last":
        found = [p for folder in folders for p in Path(folder).glob("last*.ckpt") if p.is_file()]
        if not found:
            return "last"
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path} does not exist: give an existing checkpoint, `--ckpt_path last` to resume "
                "the newest last.ckpt of the run folder, or no --ckpt_path to start afresh"
            )
    try:
        checkpoint = read_checkpoint(path)
    except ValueError as e:
        others = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()]
        good = newest_sound_checkpoint(others, max_abs_weight)
        fix = f"resume from the newest sound checkpoint with `--ckpt_path {good}`"
        if good is None:
            fix = f"no sound checkpoint is left in {path.parent}: move {path.name} away and start afresh"
        raise ValueError(f"{path} is damaged and cannot be resumed ({str(e).split(': the file')[0]}): {fix}") from e
    if checkpoint_format(checkpoint) != LIGHTNING:
        raise ValueError(
            f"{path} is a published checkpoint, not a dico training run's: --ckpt_path resumes runs; start a run "
            f"from its weights with --model.pretrained {path}"
        )
    return str(path)


def remove_partial_saves(folders: list[Path]) -> list[Path]:
    """Delete the temporary files that killed saves left in ``folders`` (:func:`temp_path_for`); call only while no
    other process saves there (the run folder's lock is held). Returns what was deleted."""
    removed = []
    for folder in folders:
        if Path(folder).is_dir():
            for stale in Path(folder).glob(f".*{TEMP_MARK}*"):
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


#: What :func:`checkpoint_format` reports.
LIGHTNING, TRAINING, STATE_DICT = "lightning", "training", "state-dict"


def checkpoint_format(checkpoint: Mapping[str, Any]) -> str:
    """``"lightning"`` (a checkpoint of our module), ``"training"`` (the published scripts' ``{"model", "ema",
    "opt", "args"}``) or ``"state-dict"`` (bare published weights); a ValueError for anything else."""
    if "state_dict" in checkpoint and ("pytorch-lightning_version" in checkpoint or "hyper_parameters" in checkpoint):
        return LIGHTNING
    if "model" in checkpoint or "ema" in checkpoint:
        return TRAINING
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return STATE_DICT
    raise ValueError(
        f"not a checkpoint dico knows (top-level keys {sorted(map(str, checkpoint))[:8]}): expected a dico Lightning "
        "checkpoint, a published training checkpoint {model, ema, opt, args} or a published state dict"
    )


def unwrap_training_checkpoint(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Mapping[str, Tensor]:
    """The published scripts save ``{"model", "ema", "opt", "args"}``; released weights are a bare state dict."""
    if checkpoint_format(checkpoint) == TRAINING:
        return checkpoint["ema" if use_ema and "ema" in checkpoint else "model"]
    return checkpoint  # type: ignore[return-value]


def load_official(
    source: Mapping[str, Any] | str | Path, arch: str = "dico", use_ema: bool = True, **config: Any
) -> nn.Module:
    """Our model holding published weights; its outputs equal the published code's.

    ``source`` is a file (read with :func:`read_checkpoint`), a bare state dict or a training checkpoint of the
    published scripts (its EMA weights by default). ``config`` overrides what is read off the weights (e.g.
    ``num_heads`` for DiT, which the weights do not reveal, ``input_size`` for DiCo). Missing or unexpected keys
    raise a KeyError naming them."""
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    return published_model(unwrap_training_checkpoint(checkpoint, use_ema), arch, **config)


@dataclass
class LoadedWeights:
    """What a checkpoint file is and which of its weights were taken.

    ``state_dict`` holds the chosen weights under the published key names (under ours for ``lightning``);
    ``training_state_dict`` the non-EMA weights of a training checkpoint when the EMA ones were chosen; ``ema``
    whether the chosen weights are an EMA (a released state dict's are; ours when trained with the EMA callback).
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
    ema: bool | None = None
    pixels: bool = False  # the model makes pixels (a dico checkpoint's decoder says so), not VAE latents

    def training_weights(self) -> dict[str, Tensor] | None:
        """A training checkpoint's non-EMA weights under our key names, when its EMA ones were chosen."""
        if self.training_state_dict is None:
            return None
        return convert_official_state_dict(self.training_state_dict, self.arch)

    def describe(self) -> str:
        kinds = {
            LIGHTNING: "a dico Lightning checkpoint",
            TRAINING: f"a published {self.arch_name} training checkpoint {{model, ema, opt, args}}",
            STATE_DICT: f"a published {self.arch_name} state dict",
        }
        size = self.model_kwargs.get("input_size")
        shape = f", {size}x{size} {'pixels' if self.pixels else 'latents'}" if size else ""
        released = f" (release {self.release.name})" if self.release else ""
        kwargs = f" {self.model_kwargs}" if self.model_kwargs else ""
        line = f"{self.path.name}{released}: {kinds[self.format]}, {self.weights} -> {self.model}{kwargs}{shape}"
        if self.release is not None and self.format != LIGHTNING and self.model != self.release.model:
            line += f" (not the release's {self.release.model} architecture: another file of the same name?)"
        return line

    @property
    def released(self) -> Release | None:
        """The release these weights are: a published-format file of it with its architecture (not a dico checkpoint
        that started from it, nor another file of the same name)."""
        r = self.release
        return r if r is not None and self.format != LIGHTNING and self.model == r.model else None

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
        return LoadedWeights(
            path,
            release or find_release(hp.get("pretrained")),
            fmt,
            "ours",
            "the weights in its state_dict (EMA when trained with the EMA callback)",
            hp.get("model", "?"),
            dict(hp.get("model_kwargs") or {}),
            checkpoint["state_dict"],
            ema="current_model_state" in checkpoint,
            pixels=makes_pixels(hp),
        )
    args, ema = None, True  # a bare state dict: the released (EMA) weights
    if fmt == TRAINING:
        args = checkpoint.get("args")  # the published scripts' argparse options (image_size, model)
        ema = use_ema and "ema" in checkpoint
        weights = "EMA weights" if ema else "non-EMA (model) weights"
        state_dict = unwrap_training_checkpoint(checkpoint, use_ema)
        training = checkpoint.get("model") if ema else None
    else:
        weights, state_dict, training = "the released (EMA) weights", checkpoint, None
    arch = infer_arch(state_dict)
    name, overrides = _architecture(state_dict, arch, release, args, model, model_kwargs or {}, image_size)
    return LoadedWeights(path, release, fmt, arch, weights, name, overrides, state_dict, training, ema)


def makes_pixels(hparams: Mapping[str, Any]) -> bool:
    """Whether a dico checkpoint's model makes pixels: its ``decoder`` (DiffusionModule's default: pixels)."""
    return (hparams.get("decoder") or {}).get("kind", "pixels") == "pixels"


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
            config["num_heads"] = published_dit_heads(config["hidden_size"])
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
        renamed = rename_pre_shared_block_keys(loaded.state_dict)  # a checkpoint of an older dico version
        ours = {k.removeprefix("model."): v for k, v in renamed.items() if k.startswith("model.")}
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


def apply_pretrained(
    model: nn.Module, source: str, name: str, model_kwargs: dict[str, Any] | None = None, use_ema: bool = True
) -> LoadedWeights:
    """Released weights (a release name, or a file in any published format) into ``model``, the backbone
    configured as ``name`` / ``model_kwargs``: the EMA weights, what sampling and the test protocol use. The returned
    record's :meth:`~LoadedWeights.training_weights` are the non-EMA ones of a training checkpoint, to fine-tune."""
    loaded = inspect_checkpoint(source, name, use_ema=use_ema)
    load_weights(model, loaded, f"the configured model {name} {model_kwargs or ''}")
    return loaded


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
        "image_size": latent * (1 if loaded.pixels else VAE_DOWNSAMPLING),
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
        info["published"] = {
            "cfg_scale": r.cfg_scale,
            "fid": r.fid,
            "inception_score": r.inception_score,
            "source": r.source,
        }
    return info


def released_ckpt_path_to_model(module: Any, ckpt_path: str | None) -> str | None:
    """``test --ckpt_path FILE_OR_RELEASE`` with a published (non-Lightning) file or a release name: load it into
    ``module`` (a :class:`~dico.module.DiffusionModule`) as ``pretrained`` would and return None (nothing left for
    Lightning to restore); any other ``ckpt_path`` (``last``, a Lightning checkpoint) comes back as it was."""
    if not ckpt_path or (ckpt_path not in CATALOGUE and not Path(ckpt_path).is_file()):
        return ckpt_path
    if ckpt_path not in CATALOGUE:
        try:
            if checkpoint_format(read_checkpoint(ckpt_path)) == LIGHTNING:
                return ckpt_path
        except (RuntimeError, ValueError):
            return ckpt_path  # let Lightning load it and report
    try:
        loaded = module.load_released(ckpt_path, fine_tune=False)
    except WeightsNotFoundError as e:
        e.option = "--ckpt_path PATH"
        raise
    print(f"[dico] {loaded.describe()}")
    return None


# ---------------------------------------------------------------------------------------------------- writing
TEMP_MARK = ".partial-"


def temp_path_for(path: Path) -> Path:
    """The hidden temporary file a save of ``path`` writes first (one per process)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.uname().nodename}-{os.getpid()}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically and durably: temp file beside it, fsync, rename, fsync the folder.

    Temporary files that killed saves of the same target left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{TEMP_MARK}"
    for stale in path.parent.iterdir():
        if stale.name.startswith(prefix):
            stale.unlink(missing_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, but atomic on local paths whatever ``$TMPDIR`` is (see module).

    Remote URLs (``s3://`` ...) keep Lightning's own transactional writer. Loading is ``weights_only`` unless the
    caller asks for full unpickling (``fit --weights_only false``, for files you trust): Lightning leaves the choice
    to torch's default, which an environment variable or an ``http(s)://`` path turns into full unpickling.
    ``python cli.py fit`` uses this plugin by default (``trainer.plugins``). Each save's size and duration is
    logged."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        location = {} if map_location is None else {"map_location": map_location}  # else Lightning's default
        return super().load_checkpoint(path, weights_only=weights_only is not False, **location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        start = time.monotonic()
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_torch_save(checkpoint, path)
        # how long a save takes: what a time-limit signal's advance must leave for it (PreemptionCheckpoint)
        local = Path(str(path))
        size = f"{local.stat().st_size / 1e9:.2f} GB, " if local.is_file() else ""
        rank_zero_info(f"checkpoint {path}: {size}written in {time.monotonic() - start:.1f} s")
