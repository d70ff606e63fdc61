"""The integer LayerNorm kernel against torch's float LayerNorm, per call: docs/performance.md.

    python benchmarks/integer_layer_norm.py

5,000 rows x 64 channels (100 images x 50 tokens of the default model), PTF-style input scales
(powers of two), one and two threads; prints milliseconds per call and the ratio in one run.
"""

from __future__ import annotations

import time

import torch

from evolq.quant import kernels


def per_call(run, repeats: int = 50) -> float:
    run()  # warm: builds the kernels on first use
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, channels = 5000, 64
    x = torch.randn(rows, channels, generator=generator) * 3
    scale = 2.0 ** torch.randint(0, 3, (channels,), generator=generator).float() * 0.05
    unit = float(scale.min())
    factor = torch.round(scale / unit)
    gain, shift = torch.randn(channels, generator=generator) / 0.04, torch.randn(channels, generator=generator) / 0.04
    for threads in (1, 2):
        torch.set_num_threads(threads)
        integer = per_call(lambda: kernels.integer_layer_norm(x, scale, factor, unit, gain, shift, 0.04))
        plain = per_call(lambda: torch.nn.functional.layer_norm(x, (channels,)))
        print(f"{threads} thread(s): integer kernel {integer * 1e3:.2f} ms, torch layer_norm {plain * 1e3:.2f} ms, "
              f"ratio {integer / plain:.2f}")


if __name__ == "__main__":
    main()
