"""Attention with its matmul inputs (q, k, v) and softmax output fake-quantized, as in FQ-ViT.

q, k and v have a quantizer each, or (the fully quantized placement) share one on the qkv
output, as the released Evol-Q code does; the scores ``q @ k^T * scale`` may have their own
quantizer before the softmax.

Without autograd the quantized matmuls run on grid levels (see :mod:`evolq.quant.layers`): the
qkv product gets its bias, q, k and v their rounding and the heads their layout in one pass,
their scales and the attention scale ride on the two batched GEMMs' alpha, and the softmax and
the rounding of its output are one pass too (both compiled, :mod:`evolq.quant.kernels`; torch's
ops where those do not run). The values are those of the dequantized formulation up to float
rounding; ``forward`` takes that path wherever it applies and the plain one otherwise
(autograd, log2 softmax, q/k norms).
"""

from __future__ import annotations

import torch
from torch import nn

from evolq.quant import kernels
from evolq.quant.grid import Grid
from evolq.quant.layers import QLinear
from evolq.quant.quantizer import UniformQuantizer


class QAttention(nn.Module):
    """Drop-in for timm's ``Attention``: same parameters, explicit (non-fused) attention math."""

    def __init__(self, attn: nn.Module, qkv: QLinear, proj: QLinear, q_quant: nn.Module, k_quant: nn.Module,
                 v_quant: nn.Module, softmax_quant: nn.Module, qkv_quant: nn.Module | None = None,
                 score_quant: nn.Module | None = None) -> None:
        """``qkv_quant`` (with Identity q/k/v quantizers) quantizes the whole qkv output with one grid;
        ``score_quant`` quantizes the scores before the softmax."""
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = qkv, proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.q_quant, self.k_quant, self.v_quant = q_quant, k_quant, v_quant
        self.qkv_quant = qkv_quant if qkv_quant is not None else nn.Identity()
        self.score_quant = score_quant if score_quant is not None else nn.Identity()
        self.softmax_quant = softmax_quant
        self._qkv_grids: tuple | None = None  # (the q, k, v grids it was made from, the combined grid)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention supports unmasked (ViT) attention only")
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self._on_levels(x):
            x = self._attend_on_levels(self.qkv.product(x)).reshape(batch, self.num_heads, tokens, self.head_dim)
        else:
            x = self._attend(self.qkv(x))
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj(x)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = qkv.shape
        return qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``(batch, heads, tokens, head_dim)``, every quantizer dequantizing."""
        q, k, v = self._heads(self.qkv_quant(qkv))
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = self.score_quant((q * self.scale) @ k.transpose(-2, -1))
        attn = self.softmax_quant(attn.softmax(dim=-1))
        return attn @ v

    def _part_quants(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The quantizers of q, k and v: the shared qkv quantizer three times, or their own."""
        if isinstance(self.qkv_quant, nn.Identity):
            return self.q_quant, self.k_quant, self.v_quant
        return (self.qkv_quant,) * 3

    def _on_levels(self, x: torch.Tensor) -> bool:
        """True where q, k, v and the qkv output carry no gradients and every q/k/v quantizer gives levels."""
        quants = self._part_quants()
        score = self.score_quant
        return (not self.qkv.tracked() and all(isinstance(q, UniformQuantizer) and q.gives_levels(x) for q in quants)
                and isinstance(self.qkv.output_quant, nn.Identity)
                and (isinstance(score, nn.Identity) or isinstance(score, UniformQuantizer) and score.gives_levels(x))
                and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))

    def _attend_on_levels(self, product: torch.Tensor) -> torch.Tensor:
        """:meth:`_attend` on grid levels, from the qkv product before its bias (a temporary, overwritten);
        the heads' outputs as ``(batch * heads, tokens, head_dim)``."""
        q, k, v = self._heads_on_levels(product)
        step_q, step_k, step_v = (quant.step(product.dtype) for quant in self._part_quants())
        scores, quant = scaled_bmm(q, k.transpose(1, 2), step_q * step_k * self.scale), self.softmax_quant
        if isinstance(self.score_quant, UniformQuantizer):
            scores = self.score_quant.grid(scores.dtype).fake_quantize(scores, inplace=True)
        if isinstance(quant, UniformQuantizer) and quant.gives_levels(scores):
            step_v = step_v * quant.step(scores.dtype)
            if kernels.accepts(scores):  # softmax and rounding in one pass
                attn = kernels.softmax_levels_(scores, quant.grid(scores.dtype).packed)
            else:
                attn = quant.levels(scores.softmax(dim=-1), inplace=True)
        else:
            attn = quant(scores.softmax(dim=-1))
        return scaled_bmm(attn, v, step_v)

    def _heads_on_levels(self, product: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k and v levels, each ``(batch * heads, tokens, head_dim)``: bias, rounding and layout in one pass
        where the compiled kernel takes them (:func:`evolq.quant.kernels.split_heads`), else in torch's."""
        grid, bias = self._qkv_grid(product.dtype), self.qkv.bias
        if kernels.accepts(product) and (bias is None or kernels.accepts(bias)):
            return kernels.split_heads(product, bias, grid.packed, self.num_heads).unbind(0)
        qkv = grid.levels(product if bias is None else product.add_(bias), inplace=True)
        return tuple(t.reshape(-1, *t.shape[2:]) for t in self._heads(qkv))

    def _qkv_grid(self, dtype: torch.dtype) -> Grid:
        """One grid over the ``qkv`` output's columns: q's, then k's, then v's (kept while theirs stay)."""
        grids = tuple(quant.grid(dtype) for quant in self._part_quants())
        cached = self._qkv_grids
        if cached is None or any(a is not b for a, b in zip(cached[0], grids)):
            device, columns = self._part_quants()[0].scale.device, self.num_heads * self.head_dim

            def per_column(values: list[float]) -> torch.Tensor:
                return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(columns)

            combined = Grid(*(per_column([getattr(g, name) for g in grids]) for name in ("inverse", "low", "high", "scale")))
            self._qkv_grids = cached = (grids, combined)
        return cached[1]


def scaled_bmm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (a @ b)`` for batches of matrices, the factor applied inside the GEMM (no extra pass)."""
    return torch.baddbmm(a.new_empty(1, 1, 1), a, b, beta=0, alpha=alpha)
