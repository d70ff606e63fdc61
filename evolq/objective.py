"""``BlockObjective``: a quantized model seen as a black-box function of one block's scale vector.

``f(x)`` is the loss of the quantized model whose block ``k`` has weight scales ``x``, against
the full-precision model's logits on the calibration images. Only what changes is recomputed:
the FP logits are computed once (and can be shared between blocks), the residual stream
entering block ``k`` is cached once per objective, so each evaluation runs blocks ``k..L`` and
the head; only block ``k``'s two layers re-quantize their weights.

fp32 is the default and gives the numbers of a plain full forward pass. ``dtype=torch.bfloat16``
is an opt-in: the cached block inputs are stored in bfloat16 and the suffix runs under autocast;
it is faster only where the hardware has bfloat16 matrix units, and its losses drift (see
``docs/performance.md``). Speed and cache memory are measured by ``benchmarks/objective.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from evolq.blocks import Block, check_vector
from evolq.errors import UsageError
from evolq.losses import Loss, get_loss
from evolq.qmodel import QuantizedModel

DEFAULT_BATCH = 100
DTYPES = (torch.float32, torch.bfloat16)


@torch.no_grad()
def fp_logits(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """The true FP model's logits: the targets every objective compares against.

    Cached tensors are made under ``no_grad`` rather than ``inference_mode`` so that the
    gradient baseline can use them too.
    """
    with qmodel.fp():
        return torch.cat([qmodel(batch) for batch in images.split(batch_size)])


@torch.inference_mode()
def model_loss(qmodel: QuantizedModel, images: torch.Tensor, targets: torch.Tensor, loss: str | Loss = "infonce",
               batch_size: int = DEFAULT_BATCH) -> float:
    """Mean per-batch loss of the quantized model as it stands (a full forward pass)."""
    loss = get_loss(loss)
    return float(torch.stack([loss(qmodel(x), t) for x, t in zip(images.split(batch_size),
                                                                   targets.split(batch_size))]).mean())


class BlockObjective:
    """``f(x) -> float`` over block ``block``'s scale vector; ``f.batch(X)``; ``f.value_and_grad(x)``.

    ``space`` (with a block index) chooses the vector: ``"paper"`` (the default), ``"weights"`` or
    ``"all"`` (:mod:`evolq.blocks`); ``layout`` names its coordinates. Build one per block visit:
    the cached prefix assumes the other blocks' scales stay as they were at construction. ``x0``
    is the block's vector at construction; calling ``f`` leaves the block's scales at the last
    ``x`` scored.

    ``inputs`` (optional) are the residual stream entering the block, one tensor per calibration
    batch, exactly as ``qmodel.prefix`` gives them; a caller walking the blocks in order can pass
    the previous block's output instead of recomputing the prefix. ``dtype`` is ``torch.float32``
    (the default, exact) or ``torch.bfloat16`` (opt-in: bfloat16 cache and autocast suffix).

    Every loss computed is remembered by its exact vector, so scoring a point twice costs one
    forward. ``x0_value`` seeds that memory with the loss at ``x0`` when the caller already has
    it: in the block-wise search the previous visit's best is the whole model's loss as it
    stands, the same number ``f(x0)`` would compute (bit for bit, tested), so each visit saves one
    of its forwards. Evaluations are counted either way.

    A vector with a zero, negative or non-finite scale raises :class:`UsageError`, unless
    ``invalid_value`` is given: then it scores that value (counted, scales unchanged). The
    search passes ``math.inf``, so an optimizer's degenerate candidate is the worst, not a crash.
    """

    def __init__(
        self,
        qmodel: QuantizedModel,
        block: int | Block,
        images: torch.Tensor,
        loss: str | Loss = "infonce",
        batch_size: int = DEFAULT_BATCH,
        targets: torch.Tensor | None = None,
        inputs: list[torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        x0_value: float | None = None,
        invalid_value: float | None = None,
        space: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise UsageError(f"objective dtype {dtype} is not supported; allowed: torch.float32 (default) or torch.bfloat16")
        self.qmodel = qmodel
        self.dtype = dtype
        if isinstance(block, Block) and space not in (None, block.space):
            raise UsageError(f"search space {space!r} differs from the given block's {block.space!r}; allowed: "
                             "a block index with space=..., or a Block alone")
        self.block = block if isinstance(block, Block) else qmodel.block(block, space or "paper")
        self.space = self.block.space
        self.layout = self.block.layout
        self.loss = get_loss(loss)
        self.batch_size = batch_size
        self.targets = fp_logits(qmodel, images, batch_size) if targets is None else targets
        self.x0 = self.block.scales()
        self.dim = self.block.dim
        self.evaluations = 0
        self.invalid_value = invalid_value
        self._known: dict[bytes, float] = {} if x0_value is None else {_key(self.x0, self.dim): float(x0_value)}
        self.images = images
        if inputs is None:
            with torch.no_grad():
                inputs = [qmodel.prefix(batch, self.block.index) for batch in self.image_batches()]
        elif [len(h) for h in inputs] != [len(batch) for batch in self.image_batches()]:
            raise UsageError(f"block inputs hold batches of {[len(h) for h in inputs]} images; allowed: one tensor "
                             f"per calibration batch of {batch_size}, as qmodel.prefix gives them")
        self._inputs = [h.to(dtype) for h in inputs] if dtype != torch.float32 else list(inputs)
        self._targets = self.target_batches()

    def image_batches(self) -> list[torch.Tensor]:
        return list(self.images.split(self.batch_size))

    def target_batches(self) -> list[torch.Tensor]:
        return list(self.targets.split(self.batch_size))

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cached block inputs and FP targets."""
        return sum(t.numel() * t.element_size() for t in [*self._inputs, *self._targets])

    def _suffix(self, h: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.qmodel.suffix(h, self.block.index)
        with torch.autocast(h.device.type, dtype=self.dtype):
            logits = self.qmodel.suffix(h, self.block.index)
        return logits.float()

    def _mean_loss(self) -> torch.Tensor:
        losses = [self.loss(self._suffix(h), t) for h, t in zip(self._inputs, self._targets)]
        return torch.stack(losses).mean()

    def __call__(self, x: np.ndarray) -> float:
        try:
            checked = self.block.set_scales(x)
        except UsageError:
            if self.invalid_value is None or np.shape(x) != (self.dim,):
                raise
            self.evaluations += 1
            return self.invalid_value
        self.evaluations += 1
        key = checked.tobytes()
        if key not in self._known:
            with torch.inference_mode():
                self._known[key] = float(self._mean_loss())
        return self._known[key]

    def value_at(self, x: np.ndarray) -> float | None:
        """The loss this objective already computed at exactly ``x``, or None."""
        return self._known.get(_key(x, self.dim))

    def batch(self, candidates: np.ndarray) -> np.ndarray:
        """Scores of several vectors (rows), sharing the cached prefix and targets; equal to ``[f(x) for x in X]``.

        The rows run one after another: stacking them into one larger batch would change the
        matrix shapes and with them the floating-point sums, so the scores would no longer be
        bit-identical to single calls (``benchmarks/objective.py`` measures the difference).
        """
        return np.array([self(x) for x in np.atleast_2d(candidates)])

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and its gradient in the scales, through a learnable-scale (straight-through) quantizer.

        Counts as one evaluation; this is what the gradient baseline optimizes with.
        """
        if any(segment.kind != "weight" for segment in self.layout):
            raise UsageError(f"gradients are available for weight scales only; search space {self.space!r} holds "
                             "activation scales; allowed: space 'paper' or 'weights' for a gradient optimizer")
        self.block.set_scales(x)
        self.evaluations += 1
        scale = torch.from_numpy(np.asarray(x, dtype=np.float32)).requires_grad_(True)
        layers = self.block.layers
        for layer, piece in zip(layers, self.block.split(scale)):
            layer.scale_override = piece
        try:
            with torch.enable_grad():
                value = self._mean_loss()
                value.backward()
        finally:
            for layer in layers:
                layer.scale_override = None
        return float(value.detach()), scale.grad.double().numpy()


def _key(x: np.ndarray, dim: int) -> bytes:
    return check_vector(x, dim).tobytes()
