"""``QuantizedModel``: a timm model with fake-quant modules, calibrated once, switchable FP <-> quantized."""

from __future__ import annotations

import copy
import math
import operator
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from evolq.blocks import Block, discover_blocks
from evolq.errors import UsageError
from evolq.families import family_of
from evolq.quant.config import QuantConfig
from evolq.quant.generic import quantize_image_apart
from evolq.quant.layers import QuantWeightLayer
from evolq.quant.quantizer import Log2Quantizer, UniformQuantizer


class QuantizedModel(nn.Module):
    """A copy of ``model`` with every quantizable op fake-quantized per ``config``.

    ``calibrate(images)`` fixes all quantization parameters; afterwards ``quantized`` (the
    default) or ``fp()`` choose which model runs, and the blocks' scale vectors can be searched.
    The model is split at block boundaries: ``prefix(x, k)`` gives the residual stream entering
    block ``k``, ``suffix(h, k)`` finishes the forward pass from there. Its ``family``
    (:mod:`evolq.families`) says how: a ViT, a CNN, a Swin or a LeViT.
    """

    def __init__(self, model: nn.Module, config: QuantConfig | str = QuantConfig()) -> None:
        super().__init__()
        self.config = QuantConfig.preset(config) if isinstance(config, str) else config
        self.family = family_of(model)
        self.model = self.family.quantize(copy.deepcopy(model).eval(), self.config)
        quantize_image_apart(self.model, self.config)
        self.units: list[nn.Module] = self.family.units(self.model)
        self.blocks: list[Block] = discover_blocks(self.model)  # the paper's space
        self._starts = [self.units.index(block.module) for block in self.blocks]  # each block's unit
        self._spaces: dict[str, list[Block]] = {}  # the others, found once calibrated
        chunked = self.family.chunked
        self.mlp_widths = [b.mlp.fc1.weight.shape[0] for b in self.units if chunked and hasattr(b.mlp, "fc1")]
        self.head_counts = [b.module.attn.num_heads for b in self.blocks] if chunked else []
        self.calibrated = False
        self.requires_grad_(False)

    # -- modes -------------------------------------------------------------------------------
    def quantizers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (UniformQuantizer, Log2Quantizer))]

    def weight_layers(self) -> list[QuantWeightLayer]:
        return [m for m in self.modules() if isinstance(m, QuantWeightLayer)]

    def _set_mode(self, mode: str) -> None:
        for quantizer in self.quantizers():
            quantizer.mode = mode

    @contextmanager
    def fp(self) -> Iterator["QuantizedModel"]:
        """Run the true full-precision model inside this block; quantization parameters are kept."""
        self._set_mode("off")
        try:
            yield self
        finally:
            self._set_mode("quant" if self.calibrated else "off")

    @contextmanager
    def dequantized(self) -> Iterator["QuantizedModel"]:
        """Inside this block every matmul runs on dequantized values, as plain fake quantization does.

        Outside it (the default) the quantized matmuls run on grid levels with the scales applied
        to the products (``evolq.quant.layers``): faster, and the same values up to float rounding
        (tested). This is the formulation of the released Evol-Q code, for references and checks.
        """
        quantizers = [q for q in self.quantizers() if isinstance(q, UniformQuantizer)]
        for quantizer in quantizers:
            quantizer.on_levels = False
        try:
            yield self
        finally:
            for quantizer in quantizers:
                quantizer.on_levels = True

    # -- calibration -------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 100, progress: bool = True) -> "QuantizedModel":
        """One pass over the calibration images: observers watch FP activations, then parameters are fixed."""
        if len(images) == 0:
            raise UsageError("calibration set is empty; allowed: at least one image")
        for layer in self.weight_layers():
            layer.calibrate_weight()
        self._set_mode("observe")
        for layer in self.weight_layers():
            layer.weight_quant.mode = "off"
        for batch in tqdm(images.split(batch_size), desc="calibrate", disable=not progress, leave=False):
            self.whole_batch_forward(batch)  # observers see whole batches
        for quantizer in self.quantizers():
            if quantizer.mode == "observe":
                quantizer.finish_calibration()
        self._spaces.clear()
        self.calibrated = True
        self._set_mode("quant")
        return self

    # -- forward pieces ----------------------------------------------------------------------
    # On the CPU the blocks run on a few images at a time (equal chunks), so that a block's widest
    # activation (the MLP's hidden layer or the attention scores) holds at most about this many
    # elements and stays in cache between the passes over it: DeiT-Tiny at 224 px runs 13 images
    # at a time, about 1.15x the speed of whole batches of 100 (benchmarks/objective.py, lever
    # "chunked blocks"); the default model gets whole batches. Every op works image by image, so a
    # chunk gives the numbers of the whole batch up to the GEMM's rounding for another row count
    # (bit for bit at these sizes here); prefix, block inputs, suffix and forward all cut the same
    # chunks, so they agree with each other bit for bit (tests/evolq/test_evolq_levels.py).
    CHUNK_ELEMENTS = 2_000_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self._embed(x), 0)

    def whole_batch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` on the whole batch at once, not in chunks: what observers see, and what an exported graph
        computes for any batch size."""
        return self._head(self._blocks(self._embed(x), 0, chunked=False))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stream entering the first unit (a ViT's residual stream, a CNN's stem output)."""
        return self.family.embed(self.model, x)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the stream leaving the last unit."""
        return self.family.head(self.model, h)

    def _chunks(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``h`` split into the image chunks that the blocks run on (see ``CHUNK_ELEMENTS``)."""
        if h.device.type != "cpu" or h.dim() != 3 or not self.family.chunked:
            return (h,)
        tokens = h.shape[1]
        widest = max(max(self.mlp_widths, default=0), max(self.head_counts, default=0) * tokens, h.shape[2])
        count = math.ceil(len(h) * tokens * widest / self.CHUNK_ELEMENTS)  # chunks of equal size
        return h.split(math.ceil(len(h) / count)) if count > 1 else (h,)

    def _blocks(self, h: torch.Tensor, start: int, stop: int | None = None, chunked: bool = True) -> torch.Tensor:
        """``h`` through the units ``start:stop`` (unit positions, not block indices)."""
        chunks = []
        for chunk in self._chunks(h) if chunked else (h,):
            for module in self.units[start:stop]:
                chunk = module(chunk)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def prefix(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The residual stream entering block ``block`` (0 = right after the embedding)."""
        return self._blocks(self._embed(x), 0, self._unit_of(block))

    def _unit_of(self, block: int) -> int:
        """The unit position where block ``block`` starts; ``len(blocks)`` is the end of the last unit."""
        return self._starts[block] if block < len(self._starts) else len(self.units)

    def block_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering every block, from one forward: entry ``k`` is ``prefix(x, k)``."""
        h, position, inputs = self._embed(x), 0, []
        for start in self._starts:
            if start > position:
                h, position = self._blocks(h, position, start), start
            inputs.append(h)
        return inputs

    def suffix(self, h: torch.Tensor, block: int) -> torch.Tensor:
        """Logits from the residual stream entering block ``block``."""
        return self._head(self._blocks(h, self._unit_of(block)))

    def block(self, index: int, space: str = "paper") -> Block:
        """Block ``index`` with the vector of search space ``space``; negative indices count from the end."""
        count = len(self.blocks)
        try:
            position = operator.index(index) if not isinstance(index, bool) else None
        except TypeError:
            position = None
        if position is None or not -count <= position < count:
            raise UsageError(f"block index {index!r} is out of range; allowed: 0..{count - 1} (or -{count}..-1)")
        return self.blocks_in(space)[position]

    def blocks_in(self, space: str) -> list[Block]:
        """Every block with the vector of search space ``space`` (made once per space and calibration)."""
        if space == "paper":
            return self.blocks
        if space not in self._spaces:
            self._spaces[space] = discover_blocks(self.model, space)  # Block checks the name
        return self._spaces[space]

    # -- scales ------------------------------------------------------------------------------
    def scales(self, space: str = "paper") -> dict[str, torch.Tensor]:
        """Every block's vector in search space ``space`` by block name, for saving."""
        return {f"block{b.index}": torch.from_numpy(b.scales()).float() for b in self.blocks_in(space)}

    def quant_state(self) -> dict[str, torch.Tensor]:
        """Every quantizer's scale and zero point: all a calibrated model needs besides its FP weights."""
        return {name: buf for name, buf in self.named_buffers() if name.endswith((".scale", ".zero_point"))}

    def load_quant_state(self, state: dict[str, torch.Tensor]) -> "QuantizedModel":
        """Restore :meth:`quant_state` output; the model is then calibrated and quantized."""
        expected = self.quant_state()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise UsageError(f"quantization state lacks {missing[0]!r} (and {len(missing) - 1} more); "
                             "allowed: a scales file written for this model and preset")
        for name in expected:
            owner, attribute = name.rsplit(".", 1)
            setattr(self.get_submodule(owner), attribute, state[name].clone())
        for layer in self.weight_layers():
            layer.invalidate()
        self._spaces.clear()  # PTF factors may differ
        self.calibrated = True
        self._set_mode("quant")
        return self

    def load_scales(self, scales: dict[str, torch.Tensor], space: str = "paper") -> None:
        """Write back what :meth:`scales` gave for the same ``space``."""
        for block in self.blocks_in(space):
            key = f"block{block.index}"
            if key not in scales:
                raise UsageError(f"scales file has no {key!r}; allowed: a file written for this model and preset")
            block.set_scales(scales[key].double().numpy())
