"""``search``: the block-wise Evol-Q loop with any optimizer, checkpointed after every block visit.

Blocks are visited last to first (``order="reverse"``), ``passes`` times. Each visit builds a
:class:`BlockObjective` over the block's vector in the search ``space`` (prefix cached for that
block), runs a fresh optimizer seeded from the run seed, pass and block for
``evaluations_per_block`` evaluations, and keeps its best point. The optimizer sees the vector
as it is (``coordinates="scales"``, the paper's) or in ratios to the visit's start
(``"ratios"``: every step relative to its own coordinate; the default of the spaces that mix
weight and activation scales). After each pass the model is scored on the held-out selection
split; the best pass (the PTQ start counts as pass 0) by top-1 (ties: loss) or by loss
(``select_by``) is what the search returns. The evaluation split is never looked at.
The visits run on the model in this process or, with ``executor="ray"``, on model replicas held
by Ray actors that score an optimizer's candidates in parallel (:mod:`evolq.visits`).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import optimizers
from evolq.blocks import check_space
from evolq.checkpoint import SearchCheckpoint
from evolq.errors import UsageError
from evolq.evaluate import batch_outputs, percent_correct
from evolq.losses import get_loss
from evolq.objective import fp_logits, model_loss
from evolq.qmodel import QuantizedModel
from evolq.visits import check_executor, open_visits

ORDERS = ("reverse", "forward")
COORDINATES = ("scales", "ratios")
SELECT_BY = ("top1", "loss")
RATIO_EPS = 0.02  # the mutation size in ratios: 2 % of each scale (chosen; docs/benchmarks.md, "Search spaces")
PARALLEL_OPTIONS = ("children_per_step", "num_workers")  # evolq's and nevergrad's "candidates asked at once"
HISTORY_COLUMNS = ["pass", "block", "optimizer", "evaluation", "value", "best", "seconds"]


def default_eps(weight_bits: int, coordinates: str = "scales") -> float:
    """The released code's mutation size on scales: 1e-4 for 8-bit weights, 1e-3 otherwise (3 and 4 bit);
    ``RATIO_EPS`` in ratios."""
    if coordinates == "ratios":
        return RATIO_EPS
    return 1e-4 if weight_bits == 8 else 1e-3


def default_coordinates(space: str) -> str:
    """What the optimizer sees by default: the paper's scales as they are; ratios where activation scales
    (about 10-100x the weight scales) or MLP weight scales (about 10x smaller than qkv's) join them."""
    return "scales" if space == "paper" else "ratios"


def parallel_options(optimizer: str, options: dict, candidates: int) -> dict:
    """``options`` with the optimizer's own setting for proposing ``candidates`` at once, unless given:
    ``children_per_step`` (``evolq``) or ``num_workers`` (``ng:*``). CMA-ES proposes its whole
    population anyway; one-at-a-time optimizers (``gradient``) take nothing."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise UsageError(f"candidates per step {candidates!r} is not allowed; allowed: an integer >= 1")
    if candidates == 1:
        return options
    try:
        accepted = accepted_options(optimizer)
    except optimizers.InputError as error:
        raise UsageError(str(error)) from None
    name = next((key for key in PARALLEL_OPTIONS if key in accepted), None)
    return options if name is None or name in options else {**options, name: candidates}


def default_select_by(space: str) -> str:
    """How the returned pass is chosen unless set: by selection top-1 in the paper's space (the released
    code's rule, on a held-out split instead of the test set); by selection loss in the others,
    where top-1 on 1,000 images picked passes that 5,000 images did not (docs/benchmarks.md,
    "Search spaces"), and the loss on 1,000 chose as 5,000 did."""
    return "top1" if space == "paper" else "loss"


def visit_seed(seed: int, pass_index: int, block: int) -> int:
    """A seed of its own for every block visit, so a resumed run draws what an uninterrupted one does."""
    return int(np.random.SeedSequence([seed, pass_index, block]).generate_state(1)[0])


def accepted_options(name: str) -> Mapping[str, inspect.Parameter]:
    """The options optimizer ``name`` takes: its constructor's parameters (``optimizers.make`` checks the name)."""
    return inspect.signature(type(optimizers.make(name)).__init__).parameters


def make_optimizer(name: str, weight_bits: int, options: dict, coordinates: str = "scales") -> optimizers.Optimizer:
    """The optimizer for one visit; ``eps`` defaults to :func:`default_eps` where accepted."""
    if "eps" not in options and "eps" in accepted_options(name):
        options = {**options, "eps": default_eps(weight_bits, coordinates)}
    return optimizers.make(name, **options)


@dataclass
class SearchResult:
    """What a search leaves: the chosen pass, its losses and the full per-evaluation history."""

    best_pass: int
    selection_top1: float
    selection_loss: float
    calib_loss: float
    evaluations: int
    history: pd.DataFrame
    passes: list[dict] = field(default_factory=list)


def check_search_settings(passes: int, evaluations_per_block: int, order: str, optimizer: str | None = None,
                          options: dict | None = None, space: str = "paper", coordinates: str | None = None,
                          select_by: str | None = None) -> None:
    """One-line :class:`UsageError` for passes or evaluations per block below 1, unknown block orders,
    spaces, coordinates or selections, and (if given) an optimizer name or options that
    ``optimizers.make`` refuses."""
    for name, value in (("passes", passes), ("evaluations per block", evaluations_per_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} {value!r} is not allowed; allowed: an integer >= 1")
    check_space(space)
    for name, value, allowed in (("block order", order, ORDERS), ("coordinates", coordinates, (None, *COORDINATES)),
                                 ("selection by", select_by, (None, *SELECT_BY))):
        if value not in allowed:
            raise UsageError(f"{name} {value!r} is unknown; allowed: {', '.join(a for a in allowed if a)}")
    if optimizer is not None:
        try:
            optimizers.make(optimizer, **(options or {}))
        except optimizers.InputError as error:
            raise UsageError(str(error)) from None


@torch.inference_mode()
def selection_score(qmodel: QuantizedModel, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                    loss: Callable, batch_size: int = 100) -> tuple[float, float]:
    """Top-1 and mean loss against FP on the held-out selection images, from one forward pass."""
    outputs = list(batch_outputs(qmodel, (images, labels), batch_size))
    losses = [float(loss(logits, t)) for (logits, _), t in zip(outputs, targets.split(batch_size))]
    return percent_correct(outputs), float(np.mean(losses))


def _better(score: tuple[float, float], best: tuple[float, float], select_by: str) -> bool:
    """Whether a pass's (selection top-1, selection loss) beats the best so far: by top-1 (ties: the lower
    loss) or by loss alone; an equal score keeps the earlier pass."""
    (top, loss), (best_top, best_loss) = score, best
    return loss < best_loss if select_by == "loss" else (top, -loss) > (best_top, -best_loss)


def search(
    qmodel: QuantizedModel,
    calib_images: torch.Tensor,
    selection: tuple[torch.Tensor, torch.Tensor],
    optimizer: str = "evolq",
    passes: int = 10,
    evaluations_per_block: int = 4,
    order: str = "reverse",
    loss: str = "infonce",
    seed: int = 0,
    optimizer_options: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    progress: bool = True,
    space: str = "paper",
    coordinates: str | None = None,
    select_by: str | None = None,
    candidates_per_step: int = 1,
    executor: str = "local",
    actors: int = 1,
    address: str | None = None,
    gpus_per_actor: float = 0,
) -> SearchResult:
    """Search every block's vector in ``space`` of a calibrated ``qmodel``; leaves it at the best pass's scales.

    ``coordinates`` and ``select_by`` None mean :func:`default_coordinates` and :func:`default_select_by`
    of the space. ``candidates_per_step`` is how many candidates the optimizer proposes together
    (:func:`parallel_options`); ``executor="ray"`` scores them on ``actors`` model replicas
    (:mod:`evolq.visits`), with the numbers of the local search on one thread.
    """
    check_executor(executor, actors, gpus_per_actor)
    options = parallel_options(optimizer, dict(optimizer_options or {}), candidates_per_step)
    check_search_settings(passes, evaluations_per_block, order, optimizer, options, space, coordinates, select_by)
    coordinates = coordinates or default_coordinates(space)
    select_by = select_by or default_select_by(space)
    loss_fn = get_loss(loss)
    targets = fp_logits(qmodel, calib_images)
    selection_images, selection_labels = selection
    selection_targets = fp_logits(qmodel, selection_images)
    blocks = list(range(len(qmodel.blocks)))
    visits = [(p, b) for p in range(1, passes + 1) for b in (blocks[::-1] if order == "reverse" else blocks)]

    state = SearchCheckpoint(checkpoint_dir, fingerprint, space) if checkpoint_dir else None
    if state is not None and resume and state.exists():
        done, history, pass_log, best = state.load(qmodel)
    else:
        top, sel_loss = selection_score(qmodel, selection_images, selection_labels, selection_targets, loss_fn)
        done, history, pass_log = 0, [], [dict(pass_index=0, selection_top1=top, selection_loss=sel_loss)]
        best = dict(pass_index=0, selection_top1=top, selection_loss=sel_loss, scales=qmodel.scales(space))
    started = time.time() - (history[-1]["seconds"] if history else 0.0)
    known_loss = None  # the whole model's loss as it stands, once a visit has computed it
    # The bar is closed on the way out, also on Ctrl-C, so messages after it start their own line.
    with (open_visits(qmodel, calib_images, targets, loss, space, order, executor, actors, address, gpus_per_actor)
          as block_visits,
          tqdm(total=len(visits), initial=done, desc=f"search ({optimizer})", disable=not progress) as bar):
        for visit, (pass_index, block) in enumerate(visits[done:], start=done):
            objective = block_visits.start(block, known_loss)
            # in ratios the optimizer moves x / x_start; in scales x itself (times ones: the same bits)
            unit = objective.x0 if coordinates == "ratios" else np.ones(objective.dim)
            searched = optimizers.Rescaled(objective, unit)
            chosen = make_optimizer(optimizer, objective.block.weight_bits, options, coordinates)
            result = chosen.minimize(searched, searched.x0, budget=evaluations_per_block,
                                     seed=visit_seed(seed, pass_index, block))
            known_loss = block_visits.keep(searched.to_x(result.x))
            offset = len(history)
            for row in result.history.itertuples():
                history.append(dict(zip(HISTORY_COLUMNS, (pass_index, block, optimizer, offset + row.evaluation,
                                                           row.value, row.best, time.time() - started))))
            bar.set_postfix(block=block, loss=f"{result.value:.4f}")
            bar.update()
            if visit + 1 == len(visits) or visits[visit + 1][0] != pass_index:
                top, sel_loss = selection_score(qmodel, selection_images, selection_labels, selection_targets, loss_fn)
                pass_log.append(dict(pass_index=pass_index, selection_top1=top, selection_loss=sel_loss))
                if _better((top, sel_loss), (best["selection_top1"], best["selection_loss"]), select_by):
                    best = dict(pass_index=pass_index, selection_top1=top, selection_loss=sel_loss,
                                scales=qmodel.scales(space))
            if state is not None:
                state.save(qmodel, visit + 1, history, pass_log, best)
    qmodel.load_scales(best["scales"], space)
    calib_loss = model_loss(qmodel, calib_images, targets, loss_fn)
    return SearchResult(
        best_pass=best["pass_index"],
        selection_top1=best["selection_top1"],
        selection_loss=best["selection_loss"],
        calib_loss=calib_loss,
        evaluations=len(history),
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        passes=pass_log,
    )
