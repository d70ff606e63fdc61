"""Integer grids that fake quantization rounds onto: ``int`` or ``uint`` of 2 to 8 bits."""

from __future__ import annotations

from dataclasses import dataclass

from evolq.errors import UsageError

ALLOWED_BITS = range(2, 9)


@dataclass(frozen=True)
class BitType:
    """A signed or unsigned integer grid; ``qmin..qmax`` are the representable levels."""

    bits: int
    signed: bool = False

    def __post_init__(self) -> None:
        check_bits("bits", self.bits)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    def __str__(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


def check_bits(name: str, bits: object) -> int:
    """``bits`` as an int, or a one-line error naming it and the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise UsageError(f"{name} {bits!r} is not allowed; allowed: integers {ALLOWED_BITS.start}..{ALLOWED_BITS.stop - 1}")
    return bits
