"""PTQ calibration time, the library's OMSE and PTF choices against FQ-ViT's plain loops, in one run.

    python benchmarks/calibration.py                   # deit_tiny, 256 random 224x224 images, w4a8, batches of 128
    python benchmarks/calibration.py --images 16       # a smoke run
    python benchmarks/calibration.py --no-reference    # the library's time alone (the reference takes minutes)

Calibrates the same model on the same images twice: once as the library does, once with every
OMSE and PTF observer choosing as FQ-ViT's code does (``reference_omse``, ``reference_ptf``
below: every candidate quantizes the whole last batch; kept here as the reference only), and a
third time with min-max observers (the floor: forward passes and min/max). Prints each time,
the speedup, and whether every scale and zero point is equal bit for bit; the last line is
``speedup=<x> cpu_speedup=<x> equal=<True|False> differing=<count>``. Times are wall seconds and, in brackets,
the process's CPU seconds: on a shared machine the CPU seconds are the steadier measure.
"""

from __future__ import annotations

import argparse
import platform
import time
import types

import timm
import torch

from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.quant.observers import OMSEObserver, PTFObserver, affine_qparams, fake_quantize


def reference_omse(self: OMSEObserver) -> tuple[torch.Tensor, torch.Tensor]:
    """FQ-ViT's OMSE: each of the 90 shrink factors quantizes the whole last batch; the first lowest error wins."""
    best, best_error = affine_qparams(self.low, self.high, self.bit_type), float("inf")
    for i in range(self.SHRINK_STEPS):
        factor = 1 - 0.01 * i
        scale, zero_point = affine_qparams(self.low * factor, self.high * factor, self.bit_type)
        error = (self.last - fake_quantize(self.last, scale, zero_point, self.bit_type, self.channel_axis)).pow(2).mean().item()
        if error < best_error:
            best, best_error = (scale, zero_point), error
    return best


def reference_ptf(self: PTFObserver) -> tuple[torch.Tensor, torch.Tensor]:
    """FQ-ViT's PTF: each factor quantizes the whole last batch; each channel takes its first lowest error."""
    largest, shared_zero = affine_qparams(self.low.min(), self.high.max(), self.bit_type)
    base = largest / max(self.FACTORS)
    channels = self.last.reshape(-1, self.last.shape[-1])
    zero = shared_zero.expand(channels.shape[-1]).contiguous()
    errors = []
    for factor in self.FACTORS:
        scale = (base * factor).expand(channels.shape[-1]).contiguous()
        restored = fake_quantize(channels, scale, zero, self.bit_type, channel_axis=-1)
        errors.append((restored - channels).pow(2).mean(dim=0))
    return base * torch.tensor(self.FACTORS, dtype=base.dtype)[torch.stack(errors).argmin(dim=0)], zero


def calibrated(model: torch.nn.Module, config: QuantConfig, images: torch.Tensor, batch: int,
               reference: bool = False) -> tuple[tuple[float, float], dict[str, torch.Tensor]]:
    """Wall and CPU seconds to calibrate a fresh quantized copy of ``model``, and its scales and zero points."""
    qmodel = QuantizedModel(model, config)
    if reference:
        for quantizer in qmodel.quantizers():
            observer = getattr(quantizer, "observer", None)
            if isinstance(observer, OMSEObserver):
                observer.qparams = types.MethodType(reference_omse, observer)
            elif isinstance(observer, PTFObserver):
                observer.qparams = types.MethodType(reference_ptf, observer)
    started, cpu = time.perf_counter(), time.process_time()
    qmodel.calibrate(images, batch_size=batch, progress=False)
    return (time.perf_counter() - started, time.process_time() - cpu), qmodel.quant_state()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="timm model, random weights")
    parser.add_argument("--images", type=int, default=256, help="random calibration images (default 256)")
    parser.add_argument("--batch", type=int, default=128, help="calibration batch size (default 128)")
    parser.add_argument("--preset", default="w4a8")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference (FQ-ViT's loops)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.patch_embed.img_size
    images = torch.randn(args.images, model.patch_embed.proj.in_channels, *size,
                         generator=torch.Generator().manual_seed(0))
    config = QuantConfig.preset(args.preset)
    print(f"{args.model}, {args.images} images, batches of {args.batch}, {args.preset}, "
          f"{torch.get_num_threads()} threads, {cpu_model()}, load {open('/proc/loadavg').read().split()[:3]}")
    minmax_s, _ = calibrated(model, config.with_(act_observer="minmax", ptf=False), images, args.batch)
    print(f"min-max observers, no PTF (the floor):  {minmax_s[0]:7.1f} s ({minmax_s[1]:.1f} s CPU)", flush=True)
    new_s, new = calibrated(model, config, images, args.batch)
    print(f"library (sampled, exact near the best): {new_s[0]:7.1f} s ({new_s[1]:.1f} s CPU)", flush=True)
    if args.no_reference:
        return 0
    old_s, old = calibrated(model, config, images, args.batch, reference=True)
    print(f"reference (FQ-ViT's loops):             {old_s[0]:7.1f} s ({old_s[1]:.1f} s CPU)")
    differing = [name for name in old if not torch.equal(old[name], new[name])]
    for name in differing:
        print(f"differs: {name}: {old[name].flatten()[:4].tolist()} (reference) vs {new[name].flatten()[:4].tolist()}")
    print(f"speedup={old_s[0] / new_s[0]:.1f} cpu_speedup={old_s[1] / new_s[1]:.1f} equal={not differing} differing={len(differing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
