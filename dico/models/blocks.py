"""adaLN-Zero residual blocks on channels-last feature maps (B, H, W, C), conditioned on a vector c (B, C_c)."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import AdaLNModulation, channel_norm, gated_residual, modulate


class DiCoBlock(nn.Module):
    """x + g1 * mixer(mod(norm(x))) ; x + g2 * ffn(mod(norm(x))), shifts/scales/gates from c.

    The mixer and FFN are given, so the same block serves DiCo (conv module), the attention
    ablations and the "DiT (U-shape)" skeleton.
    """

    def __init__(self, dim: int, mixer: nn.Module, ffn: nn.Module, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = channel_norm(dim)
        self.mixer = mixer
        self.norm2 = channel_norm(dim)
        self.ffn = ffn
        self.modulation = AdaLNModulation(cond_dim or dim, dim, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = gated_residual(x, gate1, self.mixer(modulate(self.norm1(x), shift1, scale1)))
        return gated_residual(x, gate2, self.ffn(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Modulated non-affine LayerNorm, then ``proj`` to the output: DiCo's 3x3 conv head, or the isotropic
    skeletons' per-token Linear to p x p x C_out."""

    def __init__(self, dim: int, proj: nn.Module) -> None:
        super().__init__()
        self.norm = channel_norm(dim)
        self.modulation = AdaLNModulation(dim, dim, 2)
        self.proj = proj

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)
        return self.proj(modulate(self.norm(x), shift, scale))
