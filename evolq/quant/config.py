"""``QuantConfig``: what is quantized, to how many bits, with which observers; presets by name."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from evolq.errors import UsageError
from evolq.quant.bits import check_bits
from evolq.quant.observers import OBSERVERS

SOFTMAX_KINDS = ("uniform", "log2")
PLACEMENTS = ("full", "inputs")
PRESETS = ("w8a8", "w6a6", "w4a8", "w3a8", "w4a4", "w3a4")
_PRESET = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class QuantConfig:
    """FQ-ViT-style post-training quantization settings (defaults match the released Evol-Q code).

    Weights: unsigned with zero point, per output channel, min-max, optional bias correction.
    Activations: unsigned per tensor with ``act_observer``. LayerNorm inputs: power-of-two
    factors (PTF) when ``ptf`` is on. Softmax output: ``softmax_bits`` uniform, or log2.

    ``placement`` says which tensors are quantized. ``"full"`` (the default, the paper's
    setting) is FQ-ViT's fully quantized ViT as the released Evol-Q code runs it: every tensor
    that flows between ops, the residual stream after each addition (PTF) and the attention
    scores included, LayerNorm in integer arithmetic, q/k/v sharing one quantizer, the softmax
    output observed like the other activations. ``"inputs"`` quantizes only what the matmuls
    and LayerNorms read (their inputs) and leaves the residual stream, the scores and
    LayerNorm itself in float: milder, kept as an option.

    ``input_bits`` sets the image's quantizer (the first layer's input) apart from ``abits``, as
    deployments often keep the image at 8 bits under 4-bit activations; None (the default, the
    paper's setting) quantizes it at ``abits``.
    """

    wbits: int = 8
    abits: int = 8
    act_observer: str = "omse"
    ptf: bool = True
    softmax: str = "uniform"
    softmax_bits: int = 8
    bias_correction: bool = True
    placement: str = "full"
    input_bits: int | None = None

    def __post_init__(self) -> None:
        check_bits("wbits", self.wbits)
        check_bits("abits", self.abits)
        check_bits("softmax_bits", self.softmax_bits)
        if self.input_bits is not None:
            check_bits("input_bits", self.input_bits)
        for what, value, allowed in (("activation observer", self.act_observer, tuple(OBSERVERS)),
                                     ("softmax quantizer", self.softmax, SOFTMAX_KINDS),
                                     ("placement", self.placement, PLACEMENTS)):
            if not isinstance(value, str) or value not in allowed:
                raise UsageError(f"{what} {value!r} is unknown; allowed: {', '.join(allowed)}")
        for switch in ("ptf", "bias_correction"):
            if not isinstance(getattr(self, switch), bool):
                raise UsageError(f"{switch} {getattr(self, switch)!r} is not allowed; allowed: True or False")

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantConfig":
        """``wXaY`` presets (``w8a8``, ``w4a8``, ``w3a8``, ``w4a4``, ``w3a4``, ...), with overrides."""
        match = _PRESET.match(str(name))
        if not match:
            raise UsageError(f"preset {name!r} is unknown; allowed: {', '.join(PRESETS)} (any wXaY with X, Y in 2..8)")
        return cls(wbits=int(match.group(1)), abits=int(match.group(2)), **overrides)

    @property
    def name(self) -> str:
        image = "" if self.input_bits is None else f"i{self.input_bits}"
        return f"w{self.wbits}a{self.abits}{image}"

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)
