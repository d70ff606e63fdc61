"""Observers: watch calibration tensors and turn what they saw into a scale and a zero point.

Per tensor or per channel (``channel_axis``); unsigned grids get an affine zero point, signed
grids are symmetric. The OMSE and PTF observers follow FQ-ViT: min and max are tracked over
all calibration batches, the choice (clipping factor, power-of-two factor) is made on the
last batch by the lowest L2 quantization error.
"""

from __future__ import annotations

import torch

from evolq.errors import UsageError
from evolq.quant.bits import BitType
from evolq.quant.grid import Grid

EPS = torch.finfo(torch.float32).eps


def affine_qparams(low: torch.Tensor, high: torch.Tensor, bit_type: BitType) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map ``[low, high]`` (widened to hold 0) onto the grid."""
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    if bit_type.signed:
        scale = (torch.maximum(-low, high) / ((bit_type.qmax - bit_type.qmin) / 2)).clamp_min(EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((high - low) / (bit_type.qmax - bit_type.qmin)).clamp_min(EPS)
    zero_point = (bit_type.qmin - torch.round(low / scale)).clamp(bit_type.qmin, bit_type.qmax)
    return scale, zero_point.to(torch.int32)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bit_type: BitType,
                  channel_axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize, per tensor or along ``channel_axis``.

    Where autograd needs the result, torch's fused fake-quantize kernels run (they carry the
    straight-through gradient). Otherwise the same arithmetic runs as :class:`evolq.quant.grid.Grid`'s
    elementwise passes (one compiled pass on the CPU), several times faster and equal to torch's kernels (tested).
    """
    if x.requires_grad and torch.is_grad_enabled():
        if channel_axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, bit_type.qmin, bit_type.qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero_point, channel_axis % x.dim(), bit_type.qmin, bit_type.qmax
        )
    return Grid.of(scale, zero_point, bit_type, channel_axis, x.dim(), x.dtype).fake_quantize(x)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean()


# Candidate grids are scored on a fixed random sample (the same every run) of SAMPLE_SIZE values
# in all, at least MIN_PER_CHANNEL of each channel, for the middle of each channel's values, and
# on every value of the tails (beyond the sample's TAIL and 1 - TAIL quantiles): the clipping
# that OMSE weighs against resolution happens there, on values too few for a sample to see well.
# A candidate is scored again exactly unless its estimated error exceeds the best estimate's by
# more than Z standard errors of the sampled difference plus CLOSE (relative): the float32 sums
# of the exact scoring may differ from these float64 ones that much. docs/performance.md,
# "Calibration", has the measurements behind these numbers.
SAMPLE_SIZE = 1 << 16
MIN_PER_CHANNEL = 1024
TAIL = 0.001
Z = 6.0
CLOSE = 1e-4
FACTOR_CHUNK = 8  # candidates scored together: bounds the temporaries


def _squared_errors(values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                    bit_type: BitType) -> torch.Tensor:
    """Float64 squared fake-quantization error of ``values`` on each candidate's grid (leading axis)."""
    parts = []
    for start in range(0, len(scales), FACTOR_CHUNK):
        scale, zero = scales[start:start + FACTOR_CHUNK].float(), zero_points[start:start + FACTOR_CHUNK].float()
        levels = (values * torch.reciprocal(scale)).round_()
        restored = torch.maximum(torch.minimum(levels, bit_type.qmax - zero), bit_type.qmin - zero).mul_(scale)
        parts.append(restored.sub_(values).double().pow_(2))
    return torch.cat(parts)


def sampled_errors(rows: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                   bit_type: BitType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Estimated sum of squared fake-quantization errors of each candidate grid on each row.

    ``rows`` is ``(channels, n)``; ``scales`` and ``zero_points`` are ``(candidates, channels)``.
    Returns the ``(candidates, channels)`` float64 estimates (exact sums over the tails plus the
    sample's middle scaled to the values it stands for) and the sampled terms behind them,
    ``(candidates, channels, sample)``, for :func:`near_best`; exact sums and None where a row is short.
    """
    channels, count = rows.shape
    size = max(SAMPLE_SIZE // channels, MIN_PER_CHANNEL)
    if count <= size:
        return _squared_errors(rows, scales.unsqueeze(2), zero_points.unsqueeze(2), bit_type).sum(dim=2), None
    picks = torch.randint(count, (size,), generator=torch.Generator().manual_seed(0)).to(rows.device)
    sample = rows[:, picks]
    low, high = torch.quantile(sample, torch.tensor([TAIL, 1 - TAIL], device=rows.device), dim=1, keepdim=True)
    middle = (sample >= low) & (sample <= high)
    tails = ((rows < low) | (rows > high)).nonzero()
    channel = tails[:, 0]
    exact = _squared_errors(rows[channel, tails[:, 1]], scales[:, channel], zero_points[:, channel], bit_type)
    weight = (count - torch.bincount(channel, minlength=channels)).double() / middle.sum(dim=1)
    terms = _squared_errors(sample, scales.unsqueeze(2), zero_points.unsqueeze(2), bit_type)
    terms *= (middle * weight.unsqueeze(1)).unsqueeze(0)
    return terms.sum(dim=2).index_add_(1, channel, exact), terms


def near_best(estimate: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
    """Which candidates (rows of ``estimate``, one column per choice) may have the lowest exact error.

    A candidate is out when its estimate exceeds the column's best by more than ``Z`` standard
    errors of the sampled difference (the paired terms of the two on the same sample values)
    plus ``CLOSE`` of the best; every candidate stays where an estimate is not finite.
    """
    best = estimate.argmin(dim=0, keepdim=True)
    lowest = estimate.gather(0, best)
    slack = lowest * CLOSE
    if terms is not None:
        paired = terms - terms.gather(0, best.unsqueeze(2).expand(1, *terms.shape[1:]))
        slack = slack + Z * (paired.var(dim=2) * terms.shape[2]).sqrt()
    return (estimate - lowest <= slack) | ~torch.isfinite(estimate).all(dim=0)


class Observer:
    """Base: running statistics of the tensors it is shown, per tensor or per ``channel_axis``."""

    def __init__(self, bit_type: BitType, channel_axis: int | None = None) -> None:
        self.bit_type = bit_type
        self.channel_axis = channel_axis
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max in one pass; channels on the last axis, where activations have them, need no copy."""
        if self.channel_axis is None:
            return torch.aminmax(x)
        return torch.aminmax(x.detach().movedim(self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis]), dim=0)

    def update(self, x: torch.Tensor) -> None:
        low, high = self._reduce(x.detach().float())
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)

    @property
    def seen(self) -> bool:
        return self.low is not None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.seen:
            raise RuntimeError(f"{type(self).__name__} has seen no data; calibrate first")
        return affine_qparams(self.low, self.high, self.bit_type)

    def release(self) -> None:
        """Drop what was kept only to choose the parameters, once they are fixed."""


class LastBatchObserver(Observer):
    """Min and max over all batches, and the last batch itself, on which the parameters are chosen.

    The batch is an activation of a whole calibration batch (DeiT-Tiny's MLP: 240 MB at 100
    images), so :meth:`release` drops it once the parameters are fixed: a calibrated model keeps
    only its parameters, and copies of it (Ray replicas) stay small.
    """

    def __init__(self, bit_type: BitType, channel_axis: int | None = None) -> None:
        super().__init__(bit_type, channel_axis)
        self.last: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self.last = x.detach().float().clone()

    def release(self) -> None:
        self.last = None


class MinMaxObserver(Observer):
    """Plain running min and max."""


class EMAObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` of the old value)."""

    def __init__(self, bit_type: BitType, channel_axis: int | None = None, momentum: float = 0.9) -> None:
        super().__init__(bit_type, channel_axis)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        low, high = self._reduce(x.detach().float())
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = self.momentum * self.low + (1 - self.momentum) * low
            self.high = self.momentum * self.high + (1 - self.momentum) * high


class PercentileObserver(EMAObserver):
    """EMA of each batch's ``percentile`` and ``100 - percentile`` quantiles: clips outliers."""

    def __init__(self, bit_type: BitType, channel_axis: int | None = None, percentile: float = 99.99,
                 momentum: float = 0.9) -> None:
        super().__init__(bit_type, channel_axis, momentum)
        self.percentile = percentile

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_axis is None:
            flat = x.reshape(1, -1)
        else:
            flat = x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        low, high = torch.quantile(flat, q, dim=1)
        return (low[0], high[0]) if self.channel_axis is None else (low, high)


class OMSEObserver(LastBatchObserver):
    """Min and max over all batches, shrunk by ``1 - 0.01 i`` (i < 90) to the lowest L2 error on the last batch.

    The choice is FQ-ViT's (the first factor with the lowest error, errors as :func:`_l2` computes
    them) at a fraction of the cost: every factor is first estimated on a sample of the last batch
    (:func:`sampled_errors`), and only those that may be the best (:func:`near_best`) are scored
    on the whole batch.
    """

    SHRINK_STEPS = 90

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        best, best_error = super().qparams(), float("inf")
        grids = [affine_qparams(self.low * (1 - 0.01 * i), self.high * (1 - 0.01 * i), self.bit_type)
                 for i in range(self.SHRINK_STEPS)]
        channels = 1 if self.channel_axis is None else self.last.shape[self.channel_axis]
        rows = self.last.reshape(1, -1) if self.channel_axis is None else self.last.movedim(self.channel_axis, 0)
        estimate, terms = sampled_errors(rows.reshape(channels, -1), *(
            torch.stack([grid[k].reshape(channels) for grid in grids]) for k in (0, 1)), self.bit_type)
        if terms is not None:  # one choice for all channels: their sums, their terms side by side
            terms = terms.reshape(len(grids), 1, -1)
        for i in near_best(estimate.sum(dim=1, keepdim=True), terms).squeeze(1).nonzero().flatten().tolist():
            scale, zero_point = grids[i]
            error = _l2(self.last, fake_quantize(self.last, scale, zero_point, self.bit_type, self.channel_axis)).item()
            if error < best_error:
                best, best_error = (scale, zero_point), error
        return best


class PTFObserver(LastBatchObserver):
    """Power-of-two factors for LayerNorm inputs (FQ-ViT): one base scale, each channel x 1, 2, 4 or 8.

    Channels are the last axis. The zero point is shared, so the integer LayerNorm of FQ-ViT
    could run on it; each channel's factor is the one with the lowest L2 error on the last batch,
    estimated on a sample first (as :class:`OMSEObserver` does) and scored on the whole batch only
    for the channels where more than one factor may be the best.
    """

    FACTORS = (1, 2, 4, 8)

    def __init__(self, bit_type: BitType) -> None:
        super().__init__(bit_type, channel_axis=-1)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.seen:
            raise RuntimeError("PTFObserver has seen no data; calibrate first")
        largest, shared_zero = affine_qparams(self.low.min(), self.high.max(), self.bit_type)
        base = largest / max(self.FACTORS)
        channels = self.last.reshape(-1, self.last.shape[-1])
        width = channels.shape[-1]
        factors = torch.tensor(self.FACTORS, dtype=base.dtype)
        scales = (base * factors).unsqueeze(1).expand(-1, width)
        zero = shared_zero.expand(width).contiguous()
        estimate, terms = sampled_errors(channels.T, scales, zero.expand(len(factors), -1), self.bit_type)
        choice = estimate.argmin(dim=0)
        unsure = (near_best(estimate, terms).sum(dim=0) != 1).nonzero().flatten()
        if len(unsure):
            subset = channels[:, unsure]
            errors = [(fake_quantize(subset, scale[unsure].contiguous(), zero[unsure], self.bit_type, channel_axis=-1)
                       - subset).pow(2).mean(dim=0) for scale in scales]
            choice[unsure] = torch.stack(errors).argmin(dim=0)
        return base * factors[choice], zero


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "omse": OMSEObserver,
}


def make_observer(name: str, bit_type: BitType, channel_axis: int | None = None) -> Observer:
    """An observer by name; ``ptf`` is for LayerNorm inputs (channels on the last axis)."""
    if name == "ptf":
        return PTFObserver(bit_type)
    if name not in OBSERVERS:
        raise UsageError(f"observer {name!r} is unknown; allowed: {', '.join([*OBSERVERS, 'ptf'])}")
    return OBSERVERS[name](bit_type, channel_axis)
