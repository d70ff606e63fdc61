"""``evolq landscape``: slices of a quantized model's loss (or top-1) over one block's scales.

The quantized objective is jagged; ``--reference`` draws beside it a smooth counterpart under
the same perturbation: the FP model whose block weights are rescaled per output channel by
``x / x0`` (what changing a scale does to a weight, without rounding).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

import landscapes
from evolq.blocks import Block, check_vector
from evolq.errors import UsageError
from evolq.evaluate import top1
from evolq.files import write_json, write_text
from evolq.losses import get_loss
from evolq.objective import BlockObjective
from evolq.pipeline import Prepared
from evolq.search import default_eps

METRICS = ("loss", "top1")


class BlockTop1:
    """Top-1 (percent) on given images as a function of one block's scales."""

    def __init__(self, prepared: Prepared, block: Block, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.qmodel, self.block = prepared.qmodel, block
        self.images, self.labels = images, labels
        self.x0 = block.scales()

    def __call__(self, x: np.ndarray) -> float:
        self.block.set_scales(x)
        return top1(self.qmodel, (self.images, self.labels))


class RescaledFP:
    """The smooth reference: FP loss with the block's weights scaled per channel by ``x / x0``."""

    def __init__(self, objective: BlockObjective) -> None:
        self.objective = objective
        self.block = objective.block
        self.x0 = objective.x0
        with objective.qmodel.fp(), torch.no_grad():
            self._inputs = [objective.qmodel.prefix(chunk, self.block.index) for chunk in objective.image_batches()]

    @contextmanager
    def _rescaled(self, x: np.ndarray) -> Iterator[None]:
        ratio = torch.from_numpy(check_vector(x, self.block.dim) / self.x0).float()
        layers = self.block.layers
        originals = [layer.weight.detach().clone() for layer in layers]
        try:
            for layer, piece in zip(layers, self.block.split(ratio)):
                layer.weight.data.mul_(piece.reshape(-1, *[1] * (layer.weight.dim() - 1)))
            yield
        finally:
            for layer, original in zip(layers, originals):
                layer.weight.data.copy_(original)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> float:
        qmodel, index = self.objective.qmodel, self.block.index
        with self._rescaled(x), qmodel.fp():
            losses = [self.objective.loss(qmodel.suffix(h, index), t) for h, t in zip(self._inputs, self.objective.target_batches())]
        return float(torch.stack(losses).mean())


def _change_from_start(frame: pd.DataFrame, start: float) -> pd.DataFrame:
    """``value`` becomes the change from the start point's value; the raw value is kept as ``raw_value``."""
    return frame.assign(raw_value=frame["value"], value=frame["value"] - start)


def run_landscape(prepared: Prepared, block: int, dims: int = 2, points: int = 21, radius: float | None = None,
                  metric: str = "loss", loss: str = "infonce", reference: bool = False, seed: int = 0,
                  out: str | Path | None = None, progress: bool = True) -> dict:
    """Slice block ``block``'s objective; write ``landscape.png``, ``landscape.csv``, ``roughness.json``.

    ``metric="top1"`` scores every image of ``prepared.selection`` (``--selection-size``).
    """
    if dims not in (1, 2):
        raise UsageError(f"--dims {dims!r} is not allowed; allowed: 1 or 2")
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r} is unknown; allowed: {', '.join(METRICS)}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 5:
        raise UsageError(f"--points {points!r} is not allowed; allowed: an integer >= 5 (roughness needs 5 per axis)")
    if metric == "top1" and not len(prepared.selection[0]):
        raise UsageError("--metric top1 needs held-out images; allowed: --selection-size >= 1")
    if metric == "top1" and reference:
        raise UsageError("--reference is an FP loss, not a top-1; allowed: --reference with --metric loss")
    chosen = prepared.qmodel.block(block)
    radius = default_eps(chosen.weight_bits) if radius is None else radius
    if not np.isfinite(radius) or radius <= 0:
        raise UsageError(f"--radius {radius!r} is not allowed; allowed: a number > 0")
    objective = BlockObjective(prepared.qmodel, chosen, prepared.calib_images, get_loss(loss))
    f = BlockTop1(prepared, chosen, *prepared.selection) if metric == "top1" else objective
    x0 = objective.x0
    slicer = landscapes.slice_2d if dims == 2 else landscapes.slice_1d
    kwargs = dict(radius=radius, points=points, seed=seed, normalize="absolute", progress=progress)
    surfaces = {"quantized": f}
    if reference:
        surfaces["reference"] = RescaledFP(objective)
    # Each surface is shown as its change from the start point, so both share one colour scale.
    frames = {name: _change_from_start(slicer(g, x0, **kwargs), g(x0)) for name, g in surfaces.items()}
    chosen.set_scales(x0)
    measured = f"{loss} loss" if metric == "loss" else "top-1 (%)"
    figure = landscapes.plot_landscape(
        data=frames["quantized"], reference=frames.get("reference"), label=f"quantized {prepared.qmodel.config.name}",
        reference_label="FP, weights rescaled", value_label=f"change in {measured}",
        title=f"block {chosen.index} {measured}: change from x0, radius {radius:g}", progress=False,
    )
    summary = {name: landscapes.roughness(df) for name, df in frames.items()}
    summary.update(block=chosen.index, dims=dims, points=points, radius=radius, metric=metric, loss=loss,
                   preset=prepared.qmodel.config.name, seed=seed)
    if out is not None:
        out = Path(out)
        table = pd.concat([df.assign(surface=name) for name, df in frames.items()], ignore_index=True)
        write_text(out / "landscape.csv", table.to_csv(index=False))
        landscapes.save_figure(figure, out / "landscape.png")
        write_json(out / "roughness.json", summary)
    return summary
