"""What every class-conditional diffusion backbone shares: its I/O contract, its condition embedders and the
conditioning step (input checks, label dropout, embeddings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .embeddings import ConditionEmbedder, drop_labels
from .layers import AdaLNModulation, xavier_init_, zero_init_


class DiffusionBackbone(nn.Module):
    """forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W) with C_out = 2C when learning sigma.

    The keywords every backbone takes (its ``**backbone``): ``input_size`` (latent H = W the model is built
    for), ``in_channels`` (C), ``num_classes``, ``learn_sigma`` and ``class_dropout_prob`` (label dropout for
    classifier-free guidance). Labels range over ``0..num_classes - 1``; ``num_classes`` itself is the null label
    (only when the model was built with label dropout). ``cond_widths`` are the widths of the condition vectors
    the model needs: one timestep + label embedder each (``cond[i]``).

    Subclasses build an input layer ``stem`` and a :class:`~dico.models.blocks.FinalLayer` ``head``, then call
    :meth:`reset_parameters`.
    """

    stem: nn.Module
    head: nn.Module

    #: H and W must be multiples of this (patch size, or 4 for the two down-samplings of a U-shape).
    size_multiple: int = 1

    def __init__(
        self,
        *,
        cond_widths: Sequence[int],
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        null = class_dropout_prob > 0
        self.cond = nn.ModuleList(ConditionEmbedder(w, num_classes, null_label=null) for w in cond_widths)

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.class_dropout_prob > 0 else None

    def condition(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> list[Tensor]:
        """Check the inputs, drop labels (in training, or where ``force_drop``), and embed (t, y) at every width
        of ``cond_widths``: a list of (B, width) condition vectors. ``x`` is only checked."""
        self.check_inputs(x, t, y)
        if (self.training and self.class_dropout_prob > 0) or force_drop is not None:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob, force_drop)
        return [cond(t, y) for cond in self.cond]

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

    def reset_parameters(self) -> None:
        """The published initialisation of DiT and DiCo: Xavier-uniform weights and zero biases everywhere (the
        input ``stem`` initialised like a Linear), N(0, 0.02) embeddings, adaLN-Zero (every modulation zero) and a
        zero output projection ``head.proj``, so that the untrained model predicts zeros."""
        xavier_init_(self)
        xavier_init_(self.stem, as_matrix=True)
        for cond in self.cond:
            cond.reset_parameters()
        for module in self.modules():
            if isinstance(module, AdaLNModulation):
                zero_init_(module)
        zero_init_(self.head.proj)
