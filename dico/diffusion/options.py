"""How samples are drawn (sampler, steps, guidance): the options of every sample job, evaluation and ``sample`` call,
validated here and filled in from a module's configured defaults in :meth:`SamplingOptions.resolved`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .guidance import GUIDANCE_MODES
from .sampling import SAMPLERS

# SamplingOptions field -> the DiffusionModule hyper-parameter that holds its default
MODULE_DEFAULTS = {
    "sampler": "sampler",
    "steps": "sampling_steps",
    "cfg_scale": "cfg_scale",
    "guidance_mode": "guidance_mode",
    "eta": "ddim_eta",
}


@dataclass(frozen=True)
class SamplingOptions:
    """How each sample is drawn; ``None`` takes the module's configured default (see :meth:`resolved`).

    Args:
        sampler: ``iddpm``, ``ddim`` or ``dpm++``.
        steps: sampling steps (at most the process's ``diffusion_steps``; the paper: 250).
        cfg_scale: classifier-free guidance scale (1: none).
        guidance_mode: ``official`` (the first three channels, as the published sampler) or ``all``.
        eta: DDIM's eta in [0, 1].
    """

    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance_mode: str | None = None
    eta: float | None = None

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.guidance_mode is not None and self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (e.g. --steps 250), got {self.steps}")
        if self.cfg_scale is not None and not self.cfg_scale >= 0:
            raise ValueError(
                f"cfg_scale must be >= 0 (1 = no guidance, the paper's guided runs use 1.5), got {self.cfg_scale}"
            )
        if self.eta is not None and not 0 <= self.eta <= 1:
            raise ValueError(f"eta (DDIM) must be in [0, 1], got {self.eta}")

    def resolved(self, hparams: Mapping[str, Any]) -> SamplingOptions:
        """Every unset option filled in from a :class:`~dico.module.DiffusionModule`'s hyper-parameters, and the
        steps checked against its process (``diffusion_steps``)."""
        filled = {k: hparams[h] if getattr(self, k) is None else getattr(self, k) for k, h in MODULE_DEFAULTS.items()}
        options = SamplingOptions(**filled)
        total = hparams.get("diffusion_steps")
        if total is not None and options.steps > total:  # type: ignore[operator]
            raise ValueError(
                f"steps must be <= the model's {total} diffusion steps (the paper samples with 250), "
                f"got {options.steps}"
            )
        return options

    def as_kwargs(self) -> dict[str, Any]:
        """The set options, as keyword arguments of ``DiffusionModule.sample``."""
        return {k: v for k, v in asdict(self).items() if v is not None}
