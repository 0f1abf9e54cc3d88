"""Gaussian diffusion (DDPM/iDDPM) with learned-range variances, the hybrid loss, and the iDDPM and DDIM
samplers. Method names and arguments follow the DiT/ADM code so that researchers' scripts port unchanged.

The model is any callable ``model(x, t, **model_kwargs) -> (B, 2C or C, ...)``; this package knows no
backbone. A respaced process (fewer steps) calls the model with the original timesteps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., Tensor]


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion over ``len(betas)`` steps.

    Args:
        betas: per-step betas (float64), already respaced if ``timestep_map`` is given.
        timestep_map: original timestep of each step of this process (respacing); identity if None.
        learn_sigma: the model outputs 2C channels: noise, then v in [-1, 1] interpolating the log
            variance between the posterior variance and beta (iDDPM "learned range").
        sigma_small: with fixed variances, use the posterior variance rather than beta.
        predict_xstart: the model predicts x_0 rather than the noise.
        rescale_learned_sigmas: scale the variational-bound term by T / 1000.
    """

    def __init__(
        self,
        betas: np.ndarray,
        timestep_map: Sequence[int] | None = None,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        predict_xstart: bool = False,
        rescale_learned_sigmas: bool = False,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        self.respaced = self.timestep_map != list(range(len(betas)))
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.predict_xstart = predict_xstart
        self.rescale_learned_sigmas = rescale_learned_sigmas

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([])
        fixed_large = np.append(pv[1], betas[1:]) if len(pv) > 1 else betas
        self._numpy_tables: dict[str, np.ndarray] = {
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "posterior_variance": pv,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "log_betas": np.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": self.alphas_cumprod_next,
            "fixed_variance": pv if sigma_small else fixed_large,
            "fixed_log_variance": self.posterior_log_variance_clipped if sigma_small else np.log(fixed_large),
        }
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ coefficient lookup
    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        """float64 tables (and the timestep map) on ``device``, copied there once."""
        if device not in self._device_tables:
            tables = {k: torch.from_numpy(v).to(device) for k, v in self._numpy_tables.items()}
            tables["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._device_tables[device] = tables
        return self._device_tables[device]

    def _coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """table[t] as float32, shaped (B, 1, ..., 1) to broadcast against ``like``."""
        value = self._tables(t.device)[name][t].float()
        return value.view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Indices of this process -> the original timesteps the model was trained on."""
        return self._tables(t.device)["timestep_map"][t] if self.respaced else t

    def _call(self, model: Model, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None) -> Tensor:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x_start + self._coef("posterior_mean_coef2", t, x_t) * x_t
        variance = self._coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ------------------------------------------------------------------ reverse process
    def _split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        b, c = x.shape[:2]
        if not self.learn_sigma:
            return output, None
        if output.shape != (b, 2 * c, *x.shape[2:]):
            raise ValueError(
                f"a learned-sigma model must output {(b, 2 * c, *x.shape[2:])} (noise and variance), "
                f"got {tuple(output.shape)}; build the model with learn_sigma=True "
                "or the diffusion with learn_sigma=False"
            )
        return output[:, :c], output[:, c:]

    def p_mean_variance_from_output(
        self,
        output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) and the x_0 prediction from a given model output."""
        prediction, var_values = self._split_output(output, x)
        if var_values is not None:
            min_log = self._coef("posterior_log_variance_clipped", t, x)
            max_log = self._coef("log_betas", t, x)
            frac = (var_values + 1) / 2  # v in [-1, 1] spans [posterior variance, beta]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._coef("fixed_variance", t, x).expand_as(x)
            log_variance = self._coef("fixed_log_variance", t, x).expand_as(x)

        pred_xstart = prediction if self.predict_xstart else self._predict_xstart_from_eps(x, t, prediction)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Apply the model: mean, variance, log_variance of p(x_{t-1} | x_t) and pred_xstart."""
        output = self._call(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------ training loss
    def _vb_terms_bpd(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; the decoder NLL at t = 0. Shape (B,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance_from_output(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample hybrid loss: ``mse`` on the noise (or x_0) plus, when learning sigma, ``vb`` (bits/dim)
        computed with the predicted mean detached so that the bound trains only the variance."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = self._call(model, x_t, t, model_kwargs)
        prediction, var_values = self._split_output(output, x_t)
        terms: dict[str, Tensor] = {}
        if var_values is not None:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.predict_xstart else noise
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------ samplers
    def _noise_like(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise added at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * self._noise_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step (Song et al., Eq. 12); ``eta`` = 0 is deterministic, 1 matches DDPM's variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._coef("alphas_cumprod", t, x)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean
        if eta > 0:
            nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = mean + nonzero * sigma * self._noise_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(
        self,
        step: Callable[..., dict[str, Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        generator: torch.Generator | None,
        **step_kwargs: Any,
    ) -> Iterator[dict[str, Tensor]]:
        if device is None:
            device = noise.device if noise is not None else _device_of(model)
        x = noise if noise is not None else torch.randn(tuple(shape), generator=generator, device=device)
        steps: Iterator[int] | range = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", total=self.num_timesteps)
        with torch.no_grad():
            for i in steps:
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
                out = step(model, x, t, generator=generator, **step_kwargs)
                yield out
                x = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield every step of ancestral sampling from x_T = ``noise`` (or fresh noise)."""
        yield from self._loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )

    def p_sample_loop(self, model: Model, shape: Sequence[int], **kwargs: Any) -> Tensor:
        """Ancestral (iDDPM) sampling; returns x_0. Keyword arguments as :meth:`p_sample_loop_progressive`."""
        return deque(self.p_sample_loop_progressive(model, shape, **kwargs), maxlen=1)[0]["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield every step of DDIM sampling."""
        yield from self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def ddim_sample_loop(self, model: Model, shape: Sequence[int], **kwargs: Any) -> Tensor:
        """DDIM sampling; returns x_0. Keyword arguments as :meth:`ddim_sample_loop_progressive`."""
        return deque(self.ddim_sample_loop_progressive(model, shape, **kwargs), maxlen=1)[0]["sample"]


def _device_of(model: Any) -> torch.device:
    """The device of a module's parameters, looking through wrappers (``.model``); CPU if none."""
    while model is not None:
        params = getattr(model, "parameters", None)
        if callable(params):
            return next(params()).device
        model = getattr(model, "model", None)
    return torch.device("cpu")
