"""Observers: watch calibration tensors and turn what they saw into a scale and a zero point.

Per tensor or per channel (``channel_axis``); unsigned grids get an affine zero point, signed
grids are symmetric. The OMSE and PTF observers follow FQ-ViT: min and max are tracked over
all calibration batches, the choice (clipping factor, power-of-two factor) is made on the
last batch by the lowest L2 quantization error.
"""

from __future__ import annotations

import torch

from evolq.errors import UsageError
from evolq.quant import kernels
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


def error_sums(values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bit_type: BitType,
               tails: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of squared fake-quantization errors of each column of ``values`` on each candidate grid.

    ``values`` is ``(n, channels)``; ``scales`` and ``zero_points`` are ``(candidates, channels)``.
    Returns the ``(candidates, channels)`` float64 sums; with ``tails`` (low and high per channel)
    only the values outside ``[low, high]`` count, and their number per channel comes back too.
    Each term is the float32 number torch's fake quantization gives; the compiled kernel sums in
    float64 in one pass over ``values`` for all candidates (:func:`evolq.quant.kernels.squared_errors`).
    """
    inverse = torch.reciprocal(scales.float())
    zero = zero_points.float()
    params = torch.stack([inverse, bit_type.qmin - zero, bit_type.qmax - zero, scales.float()], dim=1)
    channels = values.shape[1]
    if kernels.accepts(values) and kernels.accepts(params):
        bounds = None if tails is None else tuple(bound.float().contiguous().reshape(channels) for bound in tails)
        if channels == 1:  # one grid for all values: the kernel's flat pass
            sums, counts = kernels.squared_errors(values, params.reshape(-1, 4).contiguous(), bounds)
            return sums.unsqueeze(1), None if counts is None else counts.reshape(1)
        return kernels.squared_errors(values, params, bounds)
    keep = None if tails is None else (values < tails[0].reshape(channels)) | (values > tails[1].reshape(channels))
    sums = []
    for grid in params:
        inverse, low, high, scale = grid
        terms = (values * inverse).round_().clamp_(low, high).mul_(scale).sub_(values).pow_(2).double()
        sums.append((terms if keep is None else terms * keep).sum(dim=0))
    return torch.stack(sums), None if keep is None else keep.sum(dim=0)


# OMSE's 90 candidate grids are first scored on a fixed random sample (the same every run) of
# SAMPLE_SIZE values in all, at least MIN_PER_CHANNEL of each channel, for the middle of each
# channel's values, and on every value of the tails (beyond the sample's TAIL and 1 - TAIL
# quantiles): the clipping that OMSE weighs against resolution happens there, on values too few
# for a sample to see well. A candidate is scored again on every value unless its estimated error
# exceeds the best estimate's by more than Z standard errors of the sampled difference plus CLOSE
# (relative). docs/performance.md, "Calibration", has the measurements behind these numbers.
SAMPLE_SIZE = 1 << 16
MIN_PER_CHANNEL = 1024
TAIL = 0.001
Z = 6.0
CLOSE = 1e-4
FACTOR_CHUNK = 8  # candidates of the sample's terms made together: bounds the temporaries


def _sample_terms(sample: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                  bit_type: BitType) -> torch.Tensor:
    """Squared fake-quantization error of each sampled value ``(channels, size)`` on each candidate's grid:
    ``(candidates, channels, size)``, float32 (the sample only rules candidates out; :func:`error_sums` decides)."""
    parts = []
    for start in range(0, len(scales), FACTOR_CHUNK):
        scale = scales[start:start + FACTOR_CHUNK].float().unsqueeze(2)
        zero = zero_points[start:start + FACTOR_CHUNK].float().unsqueeze(2)
        levels = (sample * torch.reciprocal(scale)).round_()
        restored = torch.maximum(torch.minimum(levels, bit_type.qmax - zero), bit_type.qmin - zero).mul_(scale)
        parts.append(restored.sub_(sample).pow_(2))
    return torch.cat(parts)


def sampled_errors(values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                   bit_type: BitType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Estimated sum of squared fake-quantization errors of each candidate grid on each column of ``values``.

    ``values`` is ``(n, channels)``; ``scales`` and ``zero_points`` are ``(candidates, channels)``.
    Returns the ``(candidates, channels)`` float64 estimates (exact sums over the tails plus the
    sample's middle scaled to the values it stands for) and the sampled terms behind them,
    ``(candidates, channels, sample)`` in float32, for :func:`near_best`; exact sums and None where a
    column is short.
    """
    count, channels = values.shape
    size = max(SAMPLE_SIZE // channels, MIN_PER_CHANNEL)
    if count <= size:
        return error_sums(values, scales, zero_points, bit_type)[0], None
    picks = torch.randint(count, (size,), generator=torch.Generator().manual_seed(0)).to(values.device)
    sample = values[picks].T
    low, high = torch.quantile(sample, torch.tensor([TAIL, 1 - TAIL], device=values.device), dim=1, keepdim=True)
    middle = (sample >= low) & (sample <= high)
    exact, tail_counts = error_sums(values, scales, zero_points, bit_type, tails=(low, high))
    weight = (count - tail_counts).double() / middle.sum(dim=1)
    terms = _sample_terms(sample, scales, zero_points, bit_type)
    terms *= (middle * weight.unsqueeze(1)).float().unsqueeze(0)
    return terms.sum(dim=2, dtype=torch.float64) + exact, terms


def near_best(estimate: torch.Tensor, terms: torch.Tensor | None) -> torch.Tensor:
    """Which candidates (rows of ``estimate``, one column per choice) may have the lowest exact error.

    A candidate is out when its estimate exceeds the column's best by more than ``Z`` standard
    errors of the sampled difference (the paired terms of the two on the same sample values)
    plus ``CLOSE`` of the best; every candidate stays where an estimate is not finite. ``terms`` is
    overwritten (with the paired differences, centred: no new tensor of its size, which costs more
    than the arithmetic).
    """
    best = estimate.argmin(dim=0, keepdim=True)
    lowest = estimate.gather(0, best)
    slack = lowest * CLOSE
    if terms is not None:
        size = terms.shape[2]
        paired = terms.sub_(terms.gather(0, best.unsqueeze(2).expand(1, *terms.shape[1:])))
        paired.sub_(paired.mean(dim=2, keepdim=True))
        variance = torch.linalg.vector_norm(paired, dim=2).double().pow(2) / (size - 1)
        slack = slack + Z * (variance * size).sqrt()
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

    The batch is kept by reference, not copied: an activation of a whole calibration batch
    (DeiT-Tiny's MLP: 240 MB at 100 images) copied for every batch and observer took a fifth of
    DeiT-Tiny's calibration (docs/performance.md, "Calibration"). Nothing in evolq writes an
    observed tensor in place while observing; :attr:`batch` checks that with the tensor's version
    counter and refuses a batch changed since it was seen. :meth:`release` drops it once the
    parameters are fixed: a calibrated model keeps only its parameters, and copies of it (Ray
    replicas) stay small.
    """

    def __init__(self, bit_type: BitType, channel_axis: int | None = None) -> None:
        super().__init__(bit_type, channel_axis)
        self.last: torch.Tensor | None = None
        self._last_version: int | None = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self.last = x.detach().float()
        self._last_version = tensor_version(self.last)

    @property
    def batch(self) -> torch.Tensor:
        """The last batch, as it was when observed."""
        if self.last is None:
            raise RuntimeError(f"{type(self).__name__} has seen no data; calibrate first")
        if tensor_version(self.last) != self._last_version:
            raise RuntimeError(f"{type(self).__name__}: the last calibration batch was changed in place after it "
                               "was observed; observe a tensor nothing overwrites (or a copy of it)")
        return self.last

    def release(self) -> None:
        self.last = None


def tensor_version(tensor: torch.Tensor) -> int | None:
    """How often ``tensor`` was changed in place (inference tensors keep no count: None)."""
    return None if tensor.is_inference() else tensor._version


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

    The choice is FQ-ViT's (the first factor with the lowest error) at a fraction of the cost:
    every factor is first estimated on a sample of the last batch (:func:`sampled_errors`), and
    only those that may be the best (:func:`near_best`) are scored on the whole batch
    (:func:`error_sums`). The errors are summed in float64 where FQ-ViT takes float32 means, so
    two factors whose errors agree to float32's rounding may be chosen otherwise (equal errors
    still choose the first).
    """

    SHRINK_STEPS = 90

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.seen:
            raise RuntimeError("OMSEObserver has seen no data; calibrate first")
        values = self._columns()
        channels = values.shape[1]
        factors = torch.tensor([1 - 0.01 * i for i in range(self.SHRINK_STEPS)], dtype=self.low.dtype).unsqueeze(1)
        scales, zero_points = affine_qparams(self.low.reshape(1, channels) * factors,
                                             self.high.reshape(1, channels) * factors, self.bit_type)
        estimate, terms = sampled_errors(values, scales, zero_points, self.bit_type)
        if terms is not None:  # one choice for all channels: their sums, their terms side by side
            terms = terms.reshape(self.SHRINK_STEPS, 1, -1)
        candidates = near_best(estimate.sum(dim=1, keepdim=True), terms).squeeze(1).nonzero().flatten()
        errors = error_sums(values, scales[candidates], zero_points[candidates], self.bit_type)[0].sum(dim=1)
        chosen = int(candidates[int(errors.argmin())])  # argmin: the first of equal errors, as FQ-ViT's loop
        return scales[chosen].reshape(self.low.shape), zero_points[chosen].reshape(self.low.shape)

    def _columns(self) -> torch.Tensor:
        """The last batch as ``(values, channels)``: one column per tensor, or the channels on the last axis."""
        batch = self.batch
        if self.channel_axis is None:
            return batch.reshape(-1, 1)
        return batch.movedim(self.channel_axis, -1).reshape(-1, batch.shape[self.channel_axis])


class PTFObserver(LastBatchObserver):
    """Power-of-two factors for LayerNorm inputs (FQ-ViT): one base scale, each channel x 1, 2, 4 or 8.

    Channels are the last axis. The zero point is shared, so the integer LayerNorm of FQ-ViT
    could run on it; each channel's factor is the one with the lowest L2 error on the last batch
    (the first of equal ones), all four scored in one pass (:func:`error_sums`).
    """

    FACTORS = (1, 2, 4, 8)

    def __init__(self, bit_type: BitType) -> None:
        super().__init__(bit_type, channel_axis=-1)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.seen:
            raise RuntimeError("PTFObserver has seen no data; calibrate first")
        largest, shared_zero = affine_qparams(self.low.min(), self.high.max(), self.bit_type)
        base = largest / max(self.FACTORS)
        channels = self.batch.reshape(-1, self.batch.shape[-1])
        width = channels.shape[-1]
        factors = torch.tensor(self.FACTORS, dtype=base.dtype)
        zero = shared_zero.expand(width).contiguous()
        errors, _ = error_sums(channels, (base * factors).unsqueeze(1).expand(-1, width), zero.expand(len(factors), -1),
                               self.bit_type)
        return base * factors[errors.argmin(dim=0)], zero


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
