"""Compiled passes over activations, each doing what takes torch several, with torch's ops as the fallback.

Bit for bit torch's numbers (tested):

- :func:`quantize`: rounding onto a grid (torch: ``mul_``, ``round_``, ``clamp_``, and ``mul_`` for
  the scale) in one pass;
- :func:`split_heads`: attention's qkv product gets its bias, q, k and v their rounding and the
  heads the layout of the batched GEMMs (torch: an add, the rounding, three copies);
- :func:`integer_layer_norm`: FQ-ViT's integer LayerNorm (torch: about twenty passes, float64 sums).

Torch's terms, summed in an order of its own (float64 sums, the same on every machine):

- :func:`squared_errors`: the squared fake-quantization error of every value on each of several
  candidate grids, summed (OMSE's and PTF's scoring; torch: four passes and a float32 mean per grid).

Torch's numbers within float rounding (another erf or exp, another order of sums; a value that
close to a rounding boundary may land on the neighbouring level, tested):

- :func:`softmax_levels_`: attention's softmax and the rounding of its output;
- :func:`bias_gelu_levels_`: the MLP's hidden layer, bias + exact GELU + the next input's rounding;
- :func:`ptf_layer_norm`: the residual stream's per-channel (PTF) fake quantization + LayerNorm.

The same numbers on every x86-64 machine: ``kernels.c`` is compiled into clones for AVX-512F,
x86-64-v3 (AVX2 with FMA) and the generic x86-64 (SSE2), and the CPU picks one when the library
loads; every kernel gives the same bits in each clone and with any number of threads. There is
no fused multiply-add but where the C code writes ``fmaf`` (``-ffp-contract=off``), sums over a row
run in 16 partial sums and a fixed tree (not in an order set by the vector width), and no row is
split between threads. ``EVOLQ_KERNELS=generic`` (or ``x86-64-v3``, ``avx512f``) builds that clone
alone, cached under its own name: tests/evolq/test_evolq_kernels.py compares each with the
native build bit for bit. What still differs between machines is torch's own arithmetic around
the kernels (its GEMMs, and its softmax, GELU and LayerNorm where the kernels do not run): within
float rounding, so whole-model numbers agree across machines within float bounds, not bit for bit.
On an x86 CPU without FMA (before 2013) ``fmaf`` is a call into glibc's exact routine: the softmax and
GELU then run torch's ops instead (the same numbers within float rounding, not the kernels' bits).
Cost of the determinism, measured on DeiT-Tiny's shapes: none (docs/performance.md).

``kernels.c`` is plain C with OpenMP (the threads of torch's own runtime), compiled on first use
(well under a second) into ``$XDG_CACHE_HOME/evolq`` (default ``~/.cache/evolq``) and loaded with
ctypes: no torch headers, no ninja. Where no C compiler works, or ``EVOLQ_KERNELS=off``,
:func:`accepts` is False and callers use torch's ops: slower (benchmarks/objective.py,
lever "compiled kernels"). The approximate ones stay off under ``QuantizedModel.dequantized()``.
``CC`` names the compiler (GCC: the clones need its ``target_clones``; another compiler builds the
generic code alone).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterator

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no a * b + c fused behind our back (the FMA clones would round it once, the
# generic one twice); kernels.c writes fmaf() where it means one.
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
INSTRUCTION_SETS = ("generic", "x86-64-v3", "avx512f")  # kernels.c's clones, in evolq_instruction_set's numbering
_OFF, _ON = ("off", "0", "false", "no"), ("on", "1", "true", "yes", "")
_P, _N, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int  # pointers, sizes, flags and thread counts
_SIGNATURES = {  # the C functions of kernels.c and their arguments
    "evolq_quantize": [_P, _P, _N, _N, _P, _INT, _INT, _INT],
    "evolq_split_heads": [_P, _P, _P, _N, _N, _N, _N, _P, _INT],
    "evolq_softmax_levels": [_P, _N, _N, _P, _INT],
    "evolq_bias_gelu_levels": [_P, _P, _N, _N, _P, _INT],
    "evolq_ptf_layer_norm": [_P, _P, _N, _N, _P, _P, _P, ctypes.c_double, _INT],
    "evolq_integer_layer_norm": [_P, _P, _N, _N, _P, _P, ctypes.c_float, _P, _P, ctypes.c_float, _INT],
    "evolq_squared_errors": [_P, _N, _N, _P, _N, _INT, _P, _P, _P, _P, _INT],
    "evolq_instruction_set": [],
    "evolq_has_fma": [],
}

_RETURNS_INT = ("evolq_squared_errors",)  # 0, or -1 where it found no memory


def _setting(value: str) -> str | None:
    """``EVOLQ_KERNELS`` as this module uses it: None (off), "native" (every clone) or one clone alone."""
    value = value.strip().lower()
    if value in _OFF:
        return None
    if value in _ON or value == "native":
        return "native"
    if value in INSTRUCTION_SETS:
        return value
    warnings.warn(f"evolq: EVOLQ_KERNELS={value!r} is unknown; allowed: on, off, {', '.join(INSTRUCTION_SETS)}; "
                  "using on", RuntimeWarning, stacklevel=2)
    return "native"


_build = _setting(os.environ.get("EVOLQ_KERNELS", "on"))
_enabled = _build is not None


def cache_dir() -> Path:
    """Where the compiled library is kept, one file per version of ``kernels.c``, flags and build."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evolq"


def _flags(build: str) -> list[str]:
    """The compiler's arguments for ``build``: every clone ("native"), or one alone (a ``-D`` of kernels.c)."""
    return FLAGS if build == "native" else [*FLAGS, f"-DEVOLQ_ONLY_{build.upper().replace('-', '_')}"]


@cache
def _library(build: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, flags and machine type; None (with a warning) if they cannot be.

    ``build``: "native" or one of :data:`INSTRUCTION_SETS`; default: as ``EVOLQ_KERNELS`` says.
    """
    build = build or _build or "native"
    flags = _flags(build)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        if not target.is_file():
            _compile(target, flags)
        library = ctypes.CDLL(str(target))
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int if not argtypes or name in _RETURNS_INT else None
        if library.evolq_instruction_set() < 0:
            raise OSError(f"this CPU cannot run the {build} build that EVOLQ_KERNELS asks for")
        library.fast_fma = bool(library.evolq_has_fma())
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        warnings.warn(f"evolq: the compiled kernels are unavailable ({error}); using torch's ops "
                      "(slower). Set CC to a C compiler with OpenMP, XDG_CACHE_HOME to a writable folder, or "
                      "EVOLQ_KERNELS=off to silence this.",
                      RuntimeWarning, stacklevel=3)
        return None
    return library


def instruction_set() -> str | None:
    """The clone of the kernels that runs here ("generic", "x86-64-v3" or "avx512f"); None where they do not."""
    library = _library() if _enabled else None
    return None if library is None else INSTRUCTION_SETS[library.evolq_instruction_set()]


def _compile(target: Path, flags: list[str]) -> None:
    """Compile ``kernels.c`` to ``target``, atomically: a concurrent process sees no half-written library."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, "-o", temporary, str(SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[:300]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def disabled() -> Iterator[None]:
    """Inside this block torch's ops run instead of the kernels (for checks and the benchmark's levers)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def accepts(x: torch.Tensor) -> bool:
    """True where the kernels may take ``x``: a contiguous float32 CPU tensor, the kernels on and built, and
    no graph being traced (ONNX export): a call through ctypes is no operation a graph can hold."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    return _library() is not None


def _takes(tensor: torch.Tensor | None, numel: int | None = None) -> bool:
    """What the C code assumes of a tensor it reads or writes: contiguous float32 on the CPU, ``numel`` values."""
    return tensor is None or (tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()
                              and (numel is None or tensor.numel() == numel))


def _check(name: str, *fits: bool) -> None:
    """A TypeError, not memory written past a buffer, where a caller hands the C code something else."""
    if not all(fits):
        raise TypeError(f"evolq.quant.kernels.{name} takes contiguous float32 CPU tensors of matching sizes "
                        "(see accepts())")


def quantize(x: torch.Tensor, params: torch.Tensor, out: torch.Tensor | None = None,
             dequantize: bool = False) -> torch.Tensor:
    """``clamp(round(x * inverse), low, high)`` (``* scale`` if ``dequantize``) into ``out`` (default: new).

    ``params`` holds inverse, low, high, scale: shape ``(4,)`` for one grid, ``(4, columns)`` for
    one per column of ``x``'s last axis (``columns`` equal to ``x.shape[-1]``). Only where :func:`accepts` says so.
    """
    per_column = params.dim() == 2
    columns = x.shape[-1] if per_column else max(x.numel(), 1)
    out = torch.empty_like(x) if out is None else out
    _check("quantize", _takes(x), _takes(out, x.numel()), _takes(params, 4 * columns if per_column else 4))
    _library().evolq_quantize(x.data_ptr(), out.data_ptr(), x.numel() // columns, columns, params.data_ptr(),
                              int(per_column), int(dequantize), torch.get_num_threads())
    return out


def split_heads(product: torch.Tensor, bias: torch.Tensor | None, params: torch.Tensor, heads: int) -> torch.Tensor:
    """q, k, v levels ``(3, batch * heads, tokens, head_dim)`` from the qkv product ``(batch, tokens, 3 * width)``.

    One pass: the bias is added, each column rounded on its own grid (``params``: ``(4, 3 * width)``)
    and the heads laid out for the batched GEMMs. Only where :func:`accepts` the product.
    """
    batch, tokens, columns = product.shape
    head_dim = columns // (3 * heads)
    _check("split_heads", _takes(product), _takes(bias, columns), _takes(params, 4 * columns),
           columns == 3 * heads * head_dim)
    out = product.new_empty(3, batch * heads, tokens, head_dim)
    _library().evolq_split_heads(product.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                                 batch, tokens, heads, head_dim, params.data_ptr(), torch.get_num_threads())
    return out


def bias_gelu_levels_(x: torch.Tensor, bias: torch.Tensor | None, params: torch.Tensor) -> torch.Tensor:
    """``x`` overwritten with the levels of ``gelu(x + bias)`` (exact GELU) on one grid (``params``: ``(4,)``).

    One pass instead of torch's bias, GELU and rounding. Not bit for bit: its erf is a polynomial
    (GELU within 9e-7 of exact; torch's within 1.2e-6), so a value that close to a rounding
    boundary may land on the neighbouring level. Torch's ops run instead on an x86 CPU without
    FMA (see :func:`softmax_levels_`) and for tensors the kernel does not take (another dtype).
    """
    columns = x.shape[-1]
    if not (_library().fast_fma and _takes(x) and _takes(bias, columns) and _takes(params, 4)):
        hidden = x if bias is None else x.add_(bias)
        return _torch_levels_(x.copy_(torch.nn.functional.gelu(hidden)), params)
    _library().evolq_bias_gelu_levels(x.data_ptr(), None if bias is None else bias.data_ptr(), x.numel() // columns,
                                      columns, params.data_ptr(), torch.get_num_threads())
    return x


def ptf_layer_norm(x: torch.Tensor, params: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """``layer_norm(fake_quantize(x))`` over the last axis, one grid per channel (``params``: ``(4, channels)``).

    One pass instead of torch's fake quantization and LayerNorm; the sums are its own, so the
    output matches torch's within float rounding, not bit for bit. Only where :func:`accepts` ``x``.
    """
    columns = x.shape[-1]
    _check("ptf_layer_norm", _takes(x), _takes(params, 4 * columns), _takes(weight, columns), _takes(bias, columns))
    out = torch.empty_like(x)
    _library().evolq_ptf_layer_norm(x.data_ptr(), out.data_ptr(), x.numel() // columns, columns, params.data_ptr(),
                                    None if weight is None else weight.data_ptr(),
                                    None if bias is None else bias.data_ptr(), eps, torch.get_num_threads())
    return out


def integer_layer_norm(x: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor, unit: float,
                       gain_step: torch.Tensor, shift_step: torch.Tensor, step: float) -> torch.Tensor:
    """:func:`evolq.quant.layers.integer_layer_norm` in one pass per row, bit for bit its torch operations.

    Per column (``x.shape[-1]`` values each): ``scale`` of the input grid, ``factor`` = scale / ``unit``
    (the smallest), ``gain_step`` and ``shift_step`` the LayerNorm's weight and bias over ``step``, the
    output grid's scale. Only where :func:`accepts` every tensor.
    """
    columns = x.shape[-1]
    _check("integer_layer_norm", _takes(x), *(_takes(t, columns) for t in (scale, factor, gain_step, shift_step)))
    out = torch.empty_like(x)
    _library().evolq_integer_layer_norm(x.data_ptr(), out.data_ptr(), x.numel() // columns, columns, scale.data_ptr(),
                                        factor.data_ptr(), unit, gain_step.data_ptr(), shift_step.data_ptr(), step,
                                        torch.get_num_threads())
    return out


def squared_errors(x: torch.Tensor, params: torch.Tensor,
                   tails: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sums of ``(fake_quantize(v) - v)^2`` over the values ``v`` of ``x`` on each candidate grid, in one pass over ``x``.

    ``params``: ``(candidates, 4)``, one grid per candidate for the whole tensor (one sum each), or
    ``(candidates, 4, columns)``, one per column of ``x``'s last axis (a sum per column). Each term
    is torch's float32 number; the sums are float64, in a fixed order (blocks of values), so the
    same in every build and with any number of threads. ``tails`` (low, high; one value, or one per
    column): only the values below low or above high count, and their count comes back too
    (one number, or one per column). Only where :func:`accepts` ``x``.
    """
    per_column = params.dim() == 3
    columns = x.shape[-1] if per_column and x.dim() else 1
    width = columns if per_column else 1
    candidates = params.shape[0]
    _check("squared_errors", _takes(x), _takes(params, candidates * 4 * width),
           *(_takes(bound, width) for bound in (tails or ())))
    sums = torch.empty((candidates, width) if per_column else (candidates,), dtype=torch.float64)
    counts = torch.empty(width, dtype=torch.int64) if tails is not None else None
    low, high = tails if tails is not None else (None, None)
    failed = _library().evolq_squared_errors(
        x.data_ptr(), x.numel() // columns, columns, params.data_ptr(), candidates, int(per_column),
        None if low is None else low.data_ptr(), None if high is None else high.data_ptr(), sums.data_ptr(),
        None if counts is None else counts.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("evolq.quant.kernels.squared_errors: no memory for the sums of its blocks")
    return sums, (counts if per_column or counts is None else counts.reshape(()))


def softmax_levels_(scores: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``scores`` overwritten with the levels of ``softmax(scores, dim=-1)`` on one grid (``params``: ``(4,)``).

    One pass over each row instead of torch's softmax and the rounding; its exp and its order of
    summation are its own (within float rounding of torch's). Only where :func:`accepts` ``scores``.
    On an x86 CPU without FMA (before 2013) the fused multiply-adds of its exp would each be a
    call into glibc, tens of times slower than torch's softmax: torch's ops run there instead, as
    for tensors the kernel does not take (another dtype).
    """
    if not (_library().fast_fma and _takes(scores) and _takes(params, 4)):
        return _torch_levels_(scores.copy_(torch.softmax(scores, dim=-1)), params)
    columns = scores.shape[-1]
    _library().evolq_softmax_levels(scores.data_ptr(), scores.numel() // columns, columns, params.data_ptr(),
                                    torch.get_num_threads())
    return scores


def _torch_levels_(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``x`` rounded in place onto one grid (``params``: ``(4,)``) with torch's ops."""
    inverse, low, high = params[:3].tolist()
    return x.mul_(inverse).round_().clamp_(low, high)
