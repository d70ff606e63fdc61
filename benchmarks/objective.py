"""Speed of ``BlockObjective`` against a plain full-forward evaluation and against the matmul peak.

    python benchmarks/objective.py                 # both cases on the CPU, < 10 minutes on 2 cores
    python benchmarks/objective.py --quick         # a smoke run for the test suite (< 60 s)
    python benchmarks/objective.py --device cuda   # where a GPU exists

Cases, both w4a8 (``--placement``: full, the default, or inputs):
  (a) the default model (trained weights from evolq/zoo/fmnist_vit.safetensors where that file
      exists, else timm's random initialisation, seed 0), 1,000 Fashion-MNIST training images;
  (b) timm ``deit_tiny_patch16_224`` with random weights, 256 random 224x224 images.

For every block ``k`` the benchmark scores the same scale vectors two ways and checks that the
numbers agree within ``LEVELS_TOLERANCE``: ``BlockObjective`` (cached prefix, cached quantized
weights, inference mode, matmuls on grid levels, blocks run a few images at a time, compiled
one-pass kernels) and a plain reference written here, as the released Evol-Q code evaluates: a
full forward pass of the quantized model from the images under ``torch.no_grad()``, whole
batches of 100, every quantizer dequantizing (``QuantizedModel.dequantized``) with torch's ops,
every weight fake-quantized again at every forward. Averaged over all blocks it reports evaluations per second, the speedup and the
speedup the FLOPs allow (full-forward FLOPs / average suffix FLOPs), the useful FLOPs per second
(matmul FLOPs of blocks k..L and the head, counted from the shapes) as a fraction of the fp32
matmul peak, peak resident memory and cache memory. It then measures each speed lever
before/after, and the opt-in bfloat16 mode (speed, drift in loss and top-1).

Absolute timings drift on a shared machine; every ratio is taken within one run, levers from
the best of a few interleaved repeats, each block's BlockObjective time from the best of
``fast_repeats`` (3) evaluations at its point, as ``timeit`` does (the median is reported too). The matmul peak an evaluation is set against is the
rate of 2048x2048 fp32 products sustained over half a second just before and just after it
(``MatmulPeak``); the fraction of the run's best single product is reported too. The last line
is, for case (b):
``speedup=<reached> allowed=<flop-bound> peak_fraction=<fraction>``.
Results go to ``benchmarks/results/objective.json`` (``--out``), written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from evolq.allocator import reuse_freed_memory
from evolq.evaluate import top1
from evolq.files import write_json
from evolq.losses import get_loss
from evolq.objective import BlockObjective, fp_logits
from evolq.qmodel import QuantizedModel
from evolq.quant import kernels
from evolq.quant.config import QuantConfig

RESULTS = Path(__file__).resolve().parent / "results" / "objective.json"
BATCH = 100  # Evol-Q's calibration batch
EPS = 1e-3  # Evol-Q's absolute mutation size for 3/4-bit weights
BF16_TOLERANCE = 0.05  # documented bound on |loss_bf16 - loss_fp32| / |loss_fp32| (relative)
# |loss - reference| / |reference| allowed for the fp32 fast paths: the reference multiplies dequantized
# values, BlockObjective grid levels with the scales on the product; the other rounding moves a few
# activations onto the neighbouring level. Measured with placement "inputs": <= 5e-6 on the trained
# default model, ~2e-5 on DeiT-Tiny with random weights and 256 images, 2.4e-4 in --quick mode (4 random
# images, infoNCE over 4). Under "full" (the default) every op's output and the residual stream are
# rounded too, so a moved value has more places to occur and to travel through: 6.2e-4 in --quick
# mode (Intel Xeon). The bound is a check that both formulations compute the same model (a wrong
# scale or grid moves the loss by 1e-2 and more), not a precision claim.
LEVELS_TOLERANCE = 2e-3
# Calibration uses a small subset (it is not what is measured); levers run on one block with
# ``*_lever_images`` images (DeiT: one batch of 100) to keep the run under 10 minutes on 2 cores.
# bf16 is measured on the lever images too (on CPUs without bf16 units it is ~10x slower than fp32).
FULL = dict(a_images=1000, a_calib=50, a_lever_images=1000, b_images=256, b_calib=8, b_lever_images=100,
            repeats=1, fast_repeats=3, lever_repeats=2, peak_size=2048, peak_window=0.5, top1_images=1000)
QUICK = dict(a_images=200, a_calib=10, a_lever_images=200, b_images=4, b_calib=2, b_lever_images=4,
             repeats=1, fast_repeats=1, lever_repeats=1, peak_size=1024, peak_window=0.05, top1_images=200)


# -- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(f: BlockObjective) -> BlockObjective:
    """``f`` with no memory of scored points: it remembers them, and a lookup is not what we time."""
    f._known.clear()
    return f


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall seconds of one call and its result (the GPU is synchronised on both sides)."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def best_of(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Best wall time and last result of each function, the functions interleaved ``repeats`` times."""
    times: dict[str, float] = {name: float("inf") for name in fns}
    values: dict[str, object] = {}
    names = list(fns)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:  # alternate the order: no first-mover bias
            seconds, values[name] = timed(fns[name], device)
            times[name] = min(times[name], seconds)
    return times, values


class MatmulPeak:
    """The machine's fp32 (or ``dtype``) matmul rate from square ``torch.mm`` of ``size``, read two ways.

    ``burst()`` is the best of a few single products (a fraction of a second each). ``around()``
    is the rate sustained over a window of ``window`` seconds: the benchmark reads it just before
    and just after each timed evaluation, so the evaluation and the peak it is compared with see
    the same machine. On a shared host the rate moves by 2x within seconds (a co-tenant comes
    and goes), and an evaluation of several seconds set against the best burst of a whole run
    reads low for reasons that are not its own.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                 window: float = 0.5) -> None:
        generator = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
        self.device, self.flops, self.window = device, 2 * size**3, window
        self.bursts: list[float] = []
        self._product()

    def _product(self) -> None:
        torch.mm(self.a, self.b)

    def burst(self, repeats: int = 5) -> float:
        """FLOP/s of the best of ``repeats`` single products (also kept in ``bursts``)."""
        self.bursts.append(self.flops / min(timed(self._product, self.device)[0] for _ in range(repeats)))
        return self.bursts[-1]

    def sustained(self) -> float:
        """FLOP/s over back-to-back products for at least ``window`` seconds."""
        count, seconds = 0, 0.0
        while seconds < self.window or count == 0:
            seconds += timed(self._product, self.device)[0]
            count += 1
        return count * self.flops / seconds

    def around(self, fn: Callable[[], object]) -> tuple[float, object, float]:
        """Seconds and result of ``fn()``, and the mean sustained rate of the windows before and after it."""
        before = self.sustained()
        seconds, value = timed(fn, self.device)
        return seconds, value, (before + self.sustained()) / 2


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# -- FLOPs ----------------------------------------------------------------------------------------
def matmul_flops(fn: Callable[[], object]) -> int:
    """FLOPs of every mm/addmm/bmm/conv that ``fn`` runs, 2*M*N*K each, from the shapes (no timing)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def flops_per_image(qmodel: QuantizedModel, image: torch.Tensor) -> tuple[int, list[int], int]:
    """Matmul FLOPs of one image: patch embedding, each block, and norm + head."""
    model = qmodel.model
    embed = matmul_flops(lambda: qmodel.prefix(image, 0))
    h = qmodel.prefix(image, 0)
    per_block = []
    for module in model.blocks:
        per_block.append(matmul_flops(lambda: module(h)))
        h = module(h)
    head = matmul_flops(lambda: model.forward_head(model.norm(h)))
    return embed, per_block, head


# -- the plain reference ---------------------------------------------------------------------------
def reference_loss(qmodel: QuantizedModel, block_index: int, x: np.ndarray, images: torch.Tensor,
                   targets: torch.Tensor, loss: Callable, requantize: bool = True,
                   grad_mode: Callable = torch.no_grad, batch_size: int = BATCH, plain: bool = True) -> float:
    """Evol-Q's evaluation: set the scales, full forward from the images, per batch of 100, mean loss.

    Every quantizer dequantizes and every batch runs whole (:func:`plain_arithmetic`; ``plain=False``
    keeps the model's own arithmetic, for the prefix-cache lever); ``requantize`` drops every cached quantized weight before each batch, so each forward
    fake-quantizes all weights again (bias correction included), as the released code does.
    """
    qmodel.block(block_index).set_scales(x)
    layers = qmodel.weight_layers()
    losses = []
    with grad_mode(), plain_arithmetic(qmodel) if plain else nullcontext():
        for images_batch, targets_batch in zip(images.split(batch_size), targets.split(batch_size)):
            if requantize:
                for layer in layers:
                    layer.invalidate()
            losses.append(loss(qmodel(images_batch), targets_batch))
        return float(torch.stack(losses).mean())


@contextmanager
def plain_arithmetic(qmodel: QuantizedModel, levels: bool = False, chunks: bool = False,
                     compiled: bool = False) -> Iterator[None]:
    """The quantized model computing as plain fake quantization does: dequantized values, whole batches, torch's ops.

    ``levels`` / ``chunks`` / ``compiled`` keep one of the three levers of ``QuantizedModel`` on.
    """
    chunk_elements = qmodel.CHUNK_ELEMENTS
    if not chunks:
        qmodel.CHUNK_ELEMENTS = 2**62
    try:
        with nullcontext() if levels else qmodel.dequantized(), nullcontext() if compiled else kernels.disabled():
            yield
    finally:
        qmodel.CHUNK_ELEMENTS = chunk_elements


def relative_diff(a: object, b: object) -> float:
    """Largest ``|a - b| / |b|`` over the values (arrays or numbers)."""
    a, b = np.atleast_1d(np.asarray(a, dtype=float)), np.atleast_1d(np.asarray(b, dtype=float))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# -- levers that need a variant of the model -------------------------------------------------------
@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def block_params_require_grad(f: BlockObjective) -> Iterator[None]:
    """The suffix's parameters requiring grad, as in a plain nn.Module (QuantizedModel turns this off)."""
    params = [p for module in f.qmodel.model.blocks[f.block.index:] for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def suffix_loss(f: BlockObjective, x: np.ndarray, mode: Callable = torch.inference_mode, requantize: bool = False,
                inputs: list[torch.Tensor] | None = None) -> float:
    """``f(x)`` with one lever undone: another grad mode, per-batch weight re-quantization, other inputs."""
    f.block.set_scales(x)
    layers = [m for m in f.qmodel.weight_layers()]
    with mode():
        losses = []
        for h, t in zip(inputs if inputs is not None else f._inputs, f._targets):
            if requantize:
                for layer in layers:
                    layer.invalidate()
            losses.append(f.loss(f._suffix(h), t))
        return float(torch.stack(losses).mean().detach())


@contextmanager
def glibc_malloc_defaults() -> Iterator[None]:
    """glibc's start-up malloc settings for the duration (the "before" of the allocator lever)."""
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(-4, 65536)  # M_MMAP_MAX
    mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        mallopt(-4, 0)
        mallopt(-1, 2**31 - 1)


def malloc_lever(case: str, block: int, images: int, settings: dict, args: argparse.Namespace) -> dict | None:
    """Allocator lever, in two fresh processes (glibc's state cannot be reset in this one): as started vs kept."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    runs = {}
    for mode in ("off", "on"):
        command = [sys.executable, str(Path(__file__).resolve()), "--probe-malloc", mode, "--cases", case,
                   "--blocks", str(block), "--probe-images", str(images), "--seed", str(args.seed),
                   "--threads", str(torch.get_num_threads())] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"allocator lever skipped: its probe failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
            return None
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = runs["off"], runs["on"]
    return dict(lever="freed memory reused", before="glibc as started (fresh process)",
                after="reuse_freed_memory() (fresh process)", before_s=before["seconds"], after_s=after["seconds"],
                gain=before["seconds"] / after["seconds"], same_loss=before["values"] == after["values"],
                max_abs_diff=float(np.max(np.abs(np.subtract(before["values"], after["values"])))),
                max_rel_diff=relative_diff(after["values"], before["values"]),
                note=f"page faults per evaluation {before['faults']:.0f} -> {after['faults']:.0f}",
                seconds={"off": before["seconds"], "on": after["seconds"]})


def malloc_probe(args: argparse.Namespace, settings: dict) -> int:
    """Child of :func:`malloc_lever`: time one block's evaluations with glibc's allocator kept or as started."""
    if args.probe_malloc == "on":
        reuse_freed_memory()
    case = build_case(args.cases, settings, torch.device("cpu"), args.seed, args.placement)
    images = case["images"][: args.probe_images]
    block = int(args.blocks)
    f = BlockObjective(case["qmodel"], block, images, targets=fp_logits(case["qmodel"], images, BATCH))
    rng = np.random.default_rng(1)
    points = [np.abs(f.x0 + rng.uniform(-EPS, EPS, f.dim)) for _ in range(settings["lever_repeats"] + 1)]
    f(points[0])  # warm-up
    best, faults, values = float("inf"), [], []
    for x in points[1:]:
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds, value = timed(lambda: fresh(f)(x), torch.device("cpu"))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt)
        best, values = min(best, seconds), values + [value]
    print(json.dumps(dict(seconds=best, faults=float(np.median(faults)), values=values)))
    return 0


def lever_table(qmodel: QuantizedModel, f: BlockObjective, device: torch.device, repeats: int,
                compile_suffix: bool) -> list[dict]:
    """Before/after seconds per evaluation of each lever on one block (the same scale vector for both)."""
    rng = np.random.default_rng(1)
    x = np.abs(f.x0 + rng.uniform(-EPS, EPS, f.dim))
    k, images, targets, loss = f.block.index, f.images, f.targets, f.loss
    rows = []

    def row(name: str, before: str, after: str, fns: dict[str, Callable[[], object]], per: int = 1,
            note: str = "") -> None:
        times, values = best_of(fns, repeats, device)
        v_before, v_after = np.atleast_1d(values[before]), np.atleast_1d(values[after])
        rows.append(dict(lever=name, before=before, after=after, before_s=times[before] / per,
                         after_s=times[after] / per, gain=times[before] / times[after],
                         same_loss=bool(np.array_equal(v_before, v_after)),
                         max_abs_diff=float(np.max(np.abs(v_before - v_after))),
                         max_rel_diff=relative_diff(v_after, v_before), note=note,
                         seconds={name: t / per for name, t in times.items()}))

    row("prefix cache", "full forward, cached weights", "suffix only", {
        "full forward, cached weights": lambda: reference_loss(qmodel, k, x, images, targets, loss, requantize=False,
                                                               grad_mode=torch.inference_mode, plain=False),
        "suffix only": lambda: fresh(f)(x)})
    row("cached quantized weights", "suffix, all weights re-quantized per batch", "suffix, cached weights", {
        "suffix, all weights re-quantized per batch": lambda: suffix_loss(f, x, requantize=True),
        "suffix, cached weights": lambda: suffix_loss(f, x)})

    def with_grad() -> float:
        with block_params_require_grad(f):
            return suffix_loss(f, x, mode=torch.enable_grad)

    row("no autograd", "grad enabled, params require grad", "inference_mode", {
        "grad enabled, params require grad": with_grad, "no_grad": lambda: suffix_loss(f, x, mode=torch.no_grad),
        "inference_mode": lambda: suffix_loss(f, x)},
        note="no_grad in the json; under autograd the quantizers dequantize, hence the rounding difference")
    if device.type == "cpu":
        n = torch.get_num_threads()
        if n > 1:
            def one_thread() -> float:
                with threads(1):
                    return fresh(f)(x)

            row("threads", "1 thread", f"{n} threads", {"1 thread": one_thread, f"{n} threads": lambda: fresh(f)(x)})

    def plain(**kept: bool) -> float:
        with plain_arithmetic(qmodel, **kept):
            return fresh(f)(x)

    row("grid levels", "dequantized values", "levels, scales on the GEMMs", {
        "dequantized values": lambda: plain(chunks=True, compiled=True),
        "levels, scales on the GEMMs": lambda: fresh(f)(x)},
        note="same loss up to float rounding (max_rel_diff)")
    row("chunked blocks", "whole batches of 100", "chunks of images", {
        "whole batches of 100": lambda: plain(levels=True, compiled=True), "chunks of images": lambda: fresh(f)(x)},
        note=f"QuantizedModel.CHUNK_ELEMENTS = {qmodel.CHUNK_ELEMENTS:,}")
    if device.type == "cpu":
        row("compiled kernels", "torch's ops", "evolq.quant.kernels", {
            "torch's ops": lambda: plain(levels=True, chunks=True), "evolq.quant.kernels": lambda: fresh(f)(x)},
            note="one-pass rounding; qkv bias + rounding + head layout; softmax + rounding; "
                 "bias + GELU + rounding; PTF + LayerNorm"
                 + ("" if kernels.accepts(torch.zeros(1)) else " (NOT BUILT here: both sides ran torch's ops)"))
    strided = [h.transpose(0, 1).contiguous().transpose(0, 1) for h in f._inputs]
    row("contiguous cache", "block inputs token-major (strided)", "block inputs contiguous", {
        "block inputs token-major (strided)": lambda: suffix_loss(f, x, inputs=strided),
        "block inputs contiguous": lambda: suffix_loss(f, x)})

    candidates = np.stack([np.abs(f.x0 + rng.uniform(-EPS, EPS, f.dim)) for _ in range(2)])
    row("batched candidates", "2 single calls", "f.batch of 2", {
        "2 single calls": lambda: np.array([fresh(f)(c) for c in candidates]),
        "f.batch of 2": lambda: fresh(f).batch(candidates)},
        per=2)
    if compile_suffix:
        rows.append(compile_lever(qmodel, f, x, device, repeats))
    return rows


def compile_lever(qmodel: QuantizedModel, f: BlockObjective, x: np.ndarray, device: torch.device, repeats: int) -> dict:
    """``torch.compile`` of the suffix blocks (opt-in, ``--compile``): compile time, speed, exactness."""
    model, k = qmodel.model, f.block.index
    f(x)  # quantized weights cached before tracing

    def eager_suffix(h: torch.Tensor) -> torch.Tensor:
        for module in model.blocks[k:]:
            h = module(h)
        return model.forward_head(model.norm(h))

    compiled = torch.compile(eager_suffix, dynamic=False)

    def run(fn: Callable) -> float:
        with torch.inference_mode():
            return float(torch.stack([f.loss(fn(h), t) for h, t in zip(f._inputs, f._targets)]).mean())

    compile_seconds, _ = timed(lambda: run(compiled), device)
    times, values = best_of({"eager": lambda: run(eager_suffix), "compiled": lambda: run(compiled)}, repeats, device)
    return dict(lever="torch.compile", before="eager", after="compiled", before_s=times["eager"],
                after_s=times["compiled"], gain=times["eager"] / times["compiled"],
                same_loss=bool(values["eager"] == values["compiled"]),
                max_abs_diff=float(abs(values["eager"] - values["compiled"])),
                max_rel_diff=relative_diff(values["compiled"], values["eager"]),
                note=f"first call (compiling) {compile_seconds:.1f} s", seconds=times)


# -- one case ---------------------------------------------------------------------------------------
def build_case(name: str, settings: dict, device: torch.device, seed: int, placement: str = "full") -> dict:
    """Calibrated QuantizedModel, images, and (trained default model only) test images for top-1."""
    from evolq.models import create_model
    from evolq.zoo import DEFAULT_CHECKPOINT, default_architecture

    torch.manual_seed(seed)
    test = None
    if name == "default":
        trained = DEFAULT_CHECKPOINT.is_file()
        model = create_model("default") if trained else default_architecture().eval()
        weights = "trained (evolq/zoo/fmnist_vit.safetensors)" if trained else f"random (timm init, seed {seed})"
        try:
            from evolq.data import load_fmnist

            images = load_fmnist("train")[0][: settings["a_images"]]
            source = "Fashion-MNIST train"
            if trained:
                test_images, test_labels = load_fmnist("test")
                test = (test_images[: settings["top1_images"]], test_labels[: settings["top1_images"]])
        except Exception as error:  # noqa: BLE001 - no data here: random images keep the timing meaningful
            images = torch.randn(settings["a_images"], 1, 28, 28)
            source = f"random (Fashion-MNIST unavailable: {str(error)[:80]})"
        calib, lever_images = settings["a_calib"], settings["a_lever_images"]
    else:
        model = create_model("deit_tiny_patch16_224")
        weights = f"random (timm init, seed {seed})"
        images = torch.randn(settings["b_images"], 3, 224, 224)
        source = "random 224x224"
        calib, lever_images = settings["b_calib"], settings["b_lever_images"]
    started = time.perf_counter()
    # Calibration (on the CPU, a small subset) is not what is measured: OMSE's 90-step search per
    # activation quantizer is slow, and the evaluation runs the same ops whatever the scales are.
    config = QuantConfig.preset("w4a8", placement=placement)
    qmodel = QuantizedModel(model, config).calibrate(images[:calib], batch_size=calib, progress=False)
    qmodel.to(device)
    for layer in qmodel.weight_layers():
        layer.invalidate()
    return dict(name=name, model="default" if name == "default" else "deit_tiny_patch16_224", weights=weights,
                source=source, qmodel=qmodel, images=images.to(device), calib=calib, test=test,
                lever_images=min(lever_images, len(images)), calibrate_s=time.perf_counter() - started)


def run_case(case: dict, settings: dict, device: torch.device, peak: MatmulPeak, blocks: list[int] | None,
             levers: bool, compile_suffix: bool, log: Callable[[str], None],
             args: argparse.Namespace | None = None) -> dict:
    qmodel, images = case["qmodel"], case["images"]
    loss = get_loss("infonce")
    n = len(images)
    targets = fp_logits(qmodel, images, BATCH)
    embed, per_block, head = flops_per_image(qmodel, images[:1])
    full_flops = n * (embed + sum(per_block) + head)
    depth = len(qmodel.blocks)
    chosen = list(range(depth)) if blocks is None else sorted({b % depth for b in blocks})
    lever_block = chosen[len(chosen) // 2]
    bf16_blocks = {lever_block, chosen[-1]}
    m = case["lever_images"]
    rows: list[dict] = []
    lever_rows: list[dict] = []
    weight_cache = 0
    with torch.no_grad():
        inputs = [qmodel.prefix(batch, 0) for batch in images.split(BATCH)]
    for k in range(depth):
        block = qmodel.block(k)
        x0 = block.scales()
        if k in chosen:
            f = BlockObjective(qmodel, k, images, loss, targets=targets, inputs=inputs)
            rng = np.random.default_rng(100 + k)
            points = [np.abs(x0 + rng.uniform(-EPS, EPS, block.dim)) for _ in range(settings["repeats"])]
            suffix_flops = n * (sum(per_block[k:]) + head)
            t_ref = t_fast = float("inf")
            diffs = []
            works = []  # seconds x adjacent peak of every BlockObjective evaluation: the FLOPs the peak would do
            for x in points:  # interleaved: reference, then BlockObjective, at the same point
                seconds, ref = timed(lambda: reference_loss(qmodel, k, x, images, targets, loss), device)
                t_ref = min(t_ref, seconds)
                for _ in range(settings["fast_repeats"]):
                    seconds, fast, adjacent = peak.around(lambda: fresh(f)(x))
                    works.append(seconds * adjacent)
                    if seconds < t_fast:
                        t_fast, t_peak = seconds, adjacent
                diffs.append(relative_diff(fast, ref))
            row = dict(block=k, suffix_gflop=suffix_flops / 1e9, ref_s=t_ref, fast_s=t_fast,
                       speedup=t_ref / t_fast, allowed=full_flops / suffix_flops, peak_gflops=t_peak / 1e9,
                       peak_fraction=suffix_flops / t_fast / t_peak, median_peak_work=float(np.median(works)),
                       max_rel_diff=max(diffs), cache_bytes=f.cache_bytes)
            if k in bf16_blocks or (levers and k == lever_block):
                small = BlockObjective(qmodel, k, images[:m], loss, targets=targets[:m],
                                       inputs=inputs[: (m + BATCH - 1) // BATCH])
            if k in bf16_blocks:
                row.update(bf16_row(small, points[0], device))
            weight_cache = max(weight_cache, sum(layer._cached_weight.numel() * layer._cached_weight.element_size()
                                                 for layer in qmodel.weight_layers() if layer._cached_weight is not None))
            if levers and k == lever_block:
                lever_rows = lever_table(qmodel, small, device, settings["lever_repeats"], compile_suffix)
                if device.type == "cpu" and args is not None:
                    probe = malloc_lever(case["name"], k, m, settings, args)
                    if probe is not None:
                        lever_rows.insert(3, probe)
                for lever in lever_rows:
                    lever.update(block=k, images=m)
            rows.append(row)
            log(format_row(case["name"], row))
        block.set_scales(x0)
        with torch.no_grad():
            inputs = [qmodel.model.blocks[k](h) for h in inputs]
    mean_ref = float(np.mean([r["ref_s"] for r in rows]))
    mean_fast = float(np.mean([r["fast_s"] for r in rows]))
    mean_suffix = float(np.mean([r["suffix_gflop"] for r in rows])) * 1e9
    # FLOPs done over the FLOPs the matmul peak, read next to each evaluation, would have done in its seconds
    peak_work = sum(r["fast_s"] * r["peak_gflops"] for r in rows) * 1e9
    cache = max(r["cache_bytes"] for r in rows)
    summary = dict(
        images=n, blocks=len(rows), ref_evals_per_s=1 / mean_ref, fast_evals_per_s=1 / mean_fast,
        speedup=mean_ref / mean_fast, allowed=full_flops / mean_suffix,
        peak_fraction=mean_suffix * len(rows) / peak_work, adjacent_peak_gflops=peak_work / 1e9 / (mean_fast * len(rows)),
        median_peak_fraction=mean_suffix * len(rows) / sum(r["median_peak_work"] for r in rows),
        max_rel_diff=max(r["max_rel_diff"] for r in rows), full_gflop=full_flops / 1e9,
        mean_suffix_gflop=mean_suffix / 1e9, cache_bytes=cache, cache_bytes_per_1000_images=cache * 1000 / n,
        weight_cache_bytes=weight_cache, peak_rss_bytes=peak_rss_bytes())
    summary["fraction_of_allowed"] = summary["speedup"] / summary["allowed"]
    summary["equal_within_tolerance"] = summary["max_rel_diff"] <= LEVELS_TOLERANCE
    batch = next((lever for lever in lever_rows if lever["lever"] == "batched candidates"), None)
    if batch is not None:
        summary["batch_vs_single"] = batch["gain"]
        summary["batch_equal"] = batch["same_loss"]
    bf16 = [r for r in rows if "bf16_s" in r]
    if bf16:
        summary["bf16_speed_vs_fp32"] = float(np.mean([r["bf16_fp32_s"] for r in bf16]) / np.mean([r["bf16_s"] for r in bf16]))
        summary["bf16_max_rel_drift"] = max(r["bf16_rel_drift"] for r in bf16)
        summary["fp32_exact_after_bf16"] = all(r["fp32_exact_after_bf16"] for r in bf16)
        summary["bf16_blocks"] = [r["block"] for r in bf16]
        summary["bf16_images"] = bf16[0]["bf16_images"]
    if device.type == "cuda":
        summary["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if case["test"] is not None:
        summary.update(top1_fp32_and_bf16(qmodel, case["test"], device))
    return dict(case=case["name"], model=case["model"], weights=case["weights"], images_source=case["source"],
                calibration_images=case["calib"], calibrate_s=case["calibrate_s"], summary=summary, blocks=rows,
                levers=lever_rows)


def bf16_row(f32: BlockObjective, x: np.ndarray, device: torch.device) -> dict:
    """The opt-in bfloat16 objective on the same block, images and point: seconds, drift from fp32."""
    fb = BlockObjective(f32.qmodel, f32.block, f32.images, f32.loss, targets=f32.targets, inputs=f32._inputs,
                        dtype=torch.bfloat16)
    t_fp32, ref = timed(lambda: fresh(f32)(x), device)
    t_bf16, value = timed(lambda: fb(x), device)
    again = fresh(f32)(x)
    return dict(bf16_images=len(f32.images), bf16_s=t_bf16, bf16_fp32_s=t_fp32, bf16_loss=value,
                bf16_rel_drift=abs(value - ref) / max(abs(ref), 1e-12),
                fp32_exact_after_bf16=bool(again == ref))  # a bf16 objective leaves the fp32 path exact


def top1_fp32_and_bf16(qmodel: QuantizedModel, test: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict:
    """Top-1 (percent) of the quantized model on test images: fp32, and every block under bf16 autocast."""
    out = {}
    for name, dtype in (("top1_fp32", torch.float32), ("top1_bf16", torch.bfloat16)):
        def forward(chunk: torch.Tensor, dtype: torch.dtype = dtype) -> torch.Tensor:
            h = qmodel.prefix(chunk, 0).to(dtype)  # the embedding in fp32, as a block-0 objective caches it
            with torch.autocast(device.type, dtype=torch.bfloat16) if dtype != torch.float32 else nullcontext():
                return qmodel.suffix(h, 0).float()

        out[name] = top1(forward, test, BATCH, device=device)
    return out


# -- reporting --------------------------------------------------------------------------------------
HEADER = (f"{'case':8} {'block':>5} {'suffix GF':>9} {'ref s':>8} {'fast s':>8} {'speedup':>7} {'allowed':>7} "
          f"{'peak GF/s':>9} {'peak':>5} {'rel diff':>9} {'bf16 s':>8} {'fp32 s':>8} {'bf16 drift':>10}")


def format_row(case: str, r: dict) -> str:
    bf16 = (f"{r['bf16_s']:8.3f} {r['bf16_fp32_s']:8.3f} {r['bf16_rel_drift']:10.1e}" if "bf16_s" in r
            else f"{'-':>8} {'-':>8} {'-':>10}")
    return (f"{case:8} {r['block']:5d} {r['suffix_gflop']:9.2f} {r['ref_s']:8.3f} {r['fast_s']:8.3f} "
            f"{r['speedup']:7.2f} {r['allowed']:7.2f} {r['peak_gflops']:9.1f} {r['peak_fraction']:5.2f} "
            f"{r['max_rel_diff']:9.1e} {bf16}")


def format_summary(result: dict) -> list[str]:
    s = result["summary"]
    lines = [
        f"{result['case']}: {result['model']}, {result['weights']}, {s['images']} images ({result['images_source']}), "
        f"w4a8, {s['blocks']} blocks",
        f"  evaluations/s: BlockObjective {s['fast_evals_per_s']:.3f}, plain reference {s['ref_evals_per_s']:.3f}; "
        f"speedup {s['speedup']:.2f} of allowed {s['allowed']:.2f} ({100 * s['fraction_of_allowed']:.0f}%)",
        f"  useful matmul FLOP/s: {100 * s['peak_fraction']:.1f}% of the fp32 matmul peak read next to each evaluation "
        f"({s['adjacent_peak_gflops']:.1f} GFLOP/s on average; median evaluation {100 * s['median_peak_fraction']:.1f}%); "
        f"{100 * s['burst_peak_fraction']:.1f}% of the run's best single reading ({s['mean_suffix_gflop']:.1f} GFLOP per "
        f"evaluation on average, {s['full_gflop']:.1f} per full forward)",
        f"  max relative loss difference BlockObjective vs reference: {s['max_rel_diff']:.1e} "
        f"(allowed {LEVELS_TOLERANCE:g}: {'ok' if s['equal_within_tolerance'] else 'EXCEEDED'})",
        f"  cache {s['cache_bytes'] / 2**20:.1f} MiB ({s['cache_bytes_per_1000_images'] / 2**30:.3f} GiB per 1,000 "
        f"images), quantized weights {s['weight_cache_bytes'] / 2**20:.1f} MiB, peak RSS so far "
        f"{s['peak_rss_bytes'] / 2**30:.2f} GiB",
    ]
    if "bf16_speed_vs_fp32" in s:
        top = f"; top-1 fp32 {s['top1_fp32']:.2f}% bf16 {s['top1_bf16']:.2f}%" if "top1_fp32" in s else ""
        lines.append(f"  bf16 (opt-in): {s['bf16_speed_vs_fp32']:.2f}x the fp32 speed, max relative loss drift "
                     f"{s['bf16_max_rel_drift']:.1e} (blocks {s['bf16_blocks']}, {s['bf16_images']} images), fp32 still exact "
                     f"after: {s['fp32_exact_after_bf16']}{top}")
    for lever in result["levers"]:
        lines.append(f"  lever {lever['lever']:22} {lever['before_s']:8.3f} s -> {lever['after_s']:8.3f} s "
                     f"{lever['gain']:5.2f}x  same loss: {str(lever['same_loss']):5} (rel diff {lever['max_rel_diff']:.0e})  "
                     f"({lever['before']} -> "
                     f"{lever['after']}; block {lever['block']}, {lever['images']} images) {lever['note']}")
    return lines


def add_burst_fractions(result: dict, burst: float) -> None:
    """Also the fractions of the run's best single matmul reading ``burst`` (the stricter, noisier measure)."""
    for row in result["blocks"]:
        row["burst_peak_fraction"] = row["suffix_gflop"] * 1e9 / row["fast_s"] / burst
    s = result["summary"]
    s["burst_peak_fraction"] = s["mean_suffix_gflop"] * 1e9 * s["fast_evals_per_s"] / burst


def machine(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=str(device))
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the test suite (< 60 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cases", default="default,deit", help="comma-separated: default, deit")
    parser.add_argument("--blocks", default=None, help="comma-separated block indices (default: all)")
    parser.add_argument("--no-levers", action="store_true", help="skip the before/after lever measurements")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the suffix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placement", default="full", help="quantizer placement: full (default) or inputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--probe-malloc", choices=("off", "on"), help=argparse.SUPPRESS)  # the allocator lever's child
    parser.add_argument("--probe-images", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available; allowed: cpu here", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    if args.probe_malloc:
        return malloc_probe(args, settings)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not set(cases) <= {"default", "deit"} or not cases:
        print(f"--cases {args.cases!r} is not allowed; allowed: default, deit (comma-separated)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if device.type == "cpu":
        reuse_freed_memory()  # opt-in; the levers and the reference all run with it (its own lever: malloc_lever)
    peak_size = settings["peak_size"] * (4 if device.type == "cuda" else 1)
    peak = MatmulPeak(device, size=peak_size, window=settings["peak_window"])
    # bf16 matmuls are ~100x slower than fp32 on CPUs without bf16 units: a small one there.
    peak_bf16 = MatmulPeak(device, torch.bfloat16, size=peak_size if device.type == "cuda" else 512).burst(repeats=2)
    print(f"machine: {machine(device)}")
    print(f"measured matmul peak (best single product): fp32 {peak.burst() / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak_bf16 / 1e9:.1f} GFLOP/s; each evaluation is set against the fp32 rate sustained over "
          f"{peak.window} s before and after it (peak GF/s)")
    print(HEADER)
    results = []
    for name in cases:
        peak.burst()  # best single readings before and after each case, for the stricter measure
        case_started = time.perf_counter()
        case = build_case(name, settings, device, args.seed, args.placement)
        results.append(run_case(case, settings, device, peak, blocks, not args.no_levers, args.compile, print, args))
        results[-1]["seconds"] = time.perf_counter() - case_started
        peak.burst()
        print(f"{name}: calibration {case['calibrate_s']:.1f} s, case {results[-1]['seconds']:.1f} s")
        del case
    for result in results:
        add_burst_fractions(result, max(peak.bursts))
        print("\n".join(format_summary(result)))
    payload = dict(command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   quick=args.quick, machine=machine(device), matmul_peak_flops=max(peak.bursts),
                   matmul_peak_readings=peak.bursts, peak_window_s=peak.window, matmul_peak_bf16_flops=peak_bf16,
                   bf16_tolerance=BF16_TOLERANCE, seconds=time.perf_counter() - started, cases=results)
    last = next((r for r in results if r["case"] == "deit"), results[-1])["summary"]
    payload["last_line"] = (f"speedup={last['speedup']:.2f} allowed={last['allowed']:.2f} "
                            f"peak_fraction={last['peak_fraction']:.3f}")
    write_json(args.out, payload)
    print(f"total {payload['seconds']:.0f} s; wrote {args.out}")
    print(payload["last_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
