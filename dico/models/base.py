"""What every class-conditional diffusion backbone shares: its I/O contract and input checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DiffusionBackbone(nn.Module):
    """forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W) with C_out = 2C when learning sigma.

    Labels range over ``0..num_classes - 1``; ``num_classes`` itself is the null label of
    classifier-free guidance (only when the model was built with label dropout).
    """

    in_channels: int
    out_channels: int
    num_classes: int
    learn_sigma: bool
    class_dropout_prob: float
    input_size: int
    #: H and W must be multiples of this (patch size, or 4 for the two down-samplings of a U-shape).
    size_multiple: int = 1

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.class_dropout_prob > 0 else None

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """Raise a ValueError naming the fix for inputs this backbone cannot take."""
        if torch.compiler.is_compiling():
            return
        name = type(self).__name__
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects latents of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"check the latent cache or the model's in_channels"
            )
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"{name} needs H and W divisible by {m}, got {h}x{w}; crop or pad the latents")
        b = x.shape[0]
        if t.shape != (b,) or y.shape != (b,):
            raise ValueError(f"{name} expects t and y of shape ({b},), got t {tuple(t.shape)} and y {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got {y.dtype}")
        top = self.num_classes if self.null_label is not None else self.num_classes - 1
        in_range = ((y >= 0) & (y <= top)).all()
        message = (
            f"class labels must lie in [0, {top}] for a model of num_classes={self.num_classes}"
            + (f" ({self.num_classes} is the null label)" if self.null_label is not None else "")
            + "; check the dataset's class count or set num_classes"
        )
        if y.device.type == "cpu":
            if not bool(in_range):
                raise ValueError(message + f"; got labels from {int(y.min())} to {int(y.max())}")
        else:  # no host-device synchronisation on accelerators
            torch._assert_async(in_range, message)
