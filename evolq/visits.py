"""Where a search's block visits are scored: on the model in this process, or on Ray actors.

A visit is ``start(block, known_loss)``, which returns the block's objective over its vector in
the search space, then the optimizer's evaluations, then ``keep(x)``, which leaves the block at
the visit's best ``x`` and returns the loss there if it was scored.

- :class:`LocalVisits` builds a :class:`BlockObjective` on the search's own model. A reverse
  pass changes only blocks above the one it visits, so every block's inputs are taken once at
  the start of the pass (:func:`pass_inputs`) rather than one prefix per visit.
- :class:`RayVisits` holds ``actors`` Ray actors, each with a replica of the calibrated model and
  the calibration data, each running a :class:`LocalVisits` of its own. A batch of candidates is
  split over the actors in order; ``keep`` writes the best ``x`` into every replica and into the
  search's own model (which the selection split and the checkpoint read). Each actor runs the
  code and the arithmetic of the local path on one thread, so the losses are bit for bit those of
  a local search on one thread. The parallelism is the optimizer's: it must ask for several
  candidates at once (``children_per_step`` for ``evolq``, ``num_workers`` for ``ng:*``;
  CMA-ES asks its population).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from evolq.errors import UsageError
from evolq.losses import get_loss
from evolq.objective import DEFAULT_BATCH, BlockObjective
from evolq.qmodel import QuantizedModel
from optimizers.executors import EXECUTORS, batch_on_actors, ensure_ray, import_ray

PASS_CACHE_BYTES = 4 * 2**30  # most memory for every block's inputs at once, else each visit computes its own
# (DeiT-Tiny, 1,000 images of 224 pixels: 1.8 GB, cached; ViT-Base: 7.3 GB, per visit)


@torch.no_grad()
def pass_inputs(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int = DEFAULT_BATCH,
                limit_bytes: int = PASS_CACHE_BYTES) -> list[list[torch.Tensor]] | None:
    """Every block's calibration inputs (per block, per batch) from one forward, or None past ``limit_bytes``."""
    image_batches = images.split(batch_size)
    first = qmodel.block_inputs(image_batches[0])
    per_image = sum(h[0].numel() * h.element_size() for h in first)
    if per_image * len(images) > limit_bytes:
        return None
    by_batch = [first] + [qmodel.block_inputs(batch) for batch in image_batches[1:]]
    return [list(block) for block in zip(*by_batch)]


class LocalVisits:
    """Block objectives on ``qmodel`` in this process; see the module docstring."""

    def __init__(self, qmodel: QuantizedModel, images: torch.Tensor, targets: torch.Tensor, loss: Any,
                 space: str, order: str) -> None:
        self.qmodel, self.images, self.targets, self.space, self.order = qmodel, images, targets, space, order
        self.loss = get_loss(loss)
        self.objective: BlockObjective | None = None
        self._inputs: list[list[torch.Tensor]] | None = None  # taken at the start of a reverse (or resumed) pass

    def start(self, block: int, known_loss: float | None) -> BlockObjective:
        if self.order == "reverse" and (self._inputs is None or block == len(self.qmodel.blocks) - 1):
            self._inputs = pass_inputs(self.qmodel, self.images)
        self.objective = BlockObjective(self.qmodel, block, self.images, self.loss, targets=self.targets,
                                        x0_value=known_loss, invalid_value=math.inf, space=self.space,
                                        inputs=None if self._inputs is None else self._inputs[block])
        return self.objective

    def keep(self, x: np.ndarray) -> float | None:
        self.objective.block.set_scales(x)
        return self.objective.value_at(x)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalVisits:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Replica:
    """Body of one Ray actor: a replica of the search's model, visited as the search's own is."""

    def __init__(self, state: tuple) -> None:
        torch.set_num_threads(1)
        qmodel, images, targets, loss, space, order = state
        if torch.cuda.is_available() and import_ray().get_gpu_ids():  # an actor given a GPU runs on it
            qmodel, images, targets = qmodel.to("cuda"), images.to("cuda"), targets.to("cuda")
        self.visits = LocalVisits(qmodel, images, targets, loss, space, order)

    def start(self, block: int, known_loss: float | None) -> None:
        self.visits.start(block, known_loss)

    def batch(self, candidates: np.ndarray) -> np.ndarray:
        return self.visits.objective.batch(candidates)

    def keep(self, x: np.ndarray) -> None:
        self.visits.keep(x)


class _RemoteObjective:
    """One visit's objective as the optimizer sees it: ``x0``, ``dim`` and ``block`` from the search's own
    model, values from the actors (rows split in order), and the values known so far."""

    def __init__(self, actors: list, block: Any, known_loss: float | None) -> None:
        self._actors = actors
        self.block, self.x0, self.dim, self.layout = block, block.scales(), block.dim, block.layout
        self._known = {} if known_loss is None else {self.x0.tobytes(): float(known_loss)}

    def batch(self, candidates: np.ndarray) -> np.ndarray:
        candidates = np.atleast_2d(np.asarray(candidates, dtype=np.float64))
        values = batch_on_actors(self._actors, candidates)
        self._known.update((x.tobytes(), float(v)) for x, v in zip(candidates, values))
        return values

    def __call__(self, x: np.ndarray) -> float:
        return float(self.batch(x)[0])

    def value_at(self, x: np.ndarray) -> float | None:
        return self._known.get(np.asarray(x, dtype=np.float64).tobytes())


class RayVisits:
    """Block visits scored by ``actors`` Ray actors holding replicas of ``qmodel``; see the module docstring.

    ``address`` joins a cluster (``"auto"``, ``"ray://host:10001"``); without one a Ray already
    started in this process is used, or a local one is started (and shut down by :meth:`close`).
    Each actor runs on one thread and reserves one CPU and ``num_gpus`` GPUs (0.5: two actors
    share one); an actor with a GPU runs its replica there.
    """

    def __init__(self, qmodel: QuantizedModel, images: torch.Tensor, targets: torch.Tensor, loss: Any,
                 space: str, order: str, actors: int = 2, address: str | None = None, num_gpus: float = 0) -> None:
        ray = import_ray()
        self.qmodel, self.space, self._actors = qmodel, space, []
        self._started = ensure_ray(address, actors)
        self._check_resources(ray, actors, num_gpus)
        on_cpu = qmodel if images.device.type == "cpu" else copy.deepcopy(qmodel).cpu()
        state = ray.put((on_cpu, images.cpu(), targets.cpu(), loss, space, order))
        actor_class = ray.remote(num_cpus=1, num_gpus=num_gpus)(_Replica)
        self._actors = [actor_class.remote(state) for _ in range(actors)]
        self._objective: _RemoteObjective | None = None

    def _check_resources(self, ray: Any, actors: int, num_gpus: float) -> None:
        """A clear error rather than actors that wait forever for CPUs or GPUs the cluster does not have."""
        have = ray.cluster_resources()
        for name, need in (("CPU", actors), ("GPU", actors * num_gpus)):
            if need > have.get(name, 0):
                self.close()
                raise UsageError(f"{actors} actors need {need:g} {name}s; the Ray cluster has {have.get(name, 0):g}; "
                                 "allowed: fewer --actors or --gpus-per-actor, or a larger cluster")

    def start(self, block: int, known_loss: float | None) -> _RemoteObjective:
        for actor in self._actors:
            actor.start.remote(block, known_loss)  # an actor runs its calls in the order they were made
        self._objective = _RemoteObjective(self._actors, self.qmodel.block(block, self.space), known_loss)
        return self._objective

    def keep(self, x: np.ndarray) -> float | None:
        self._objective.block.set_scales(x)
        import_ray().get([actor.keep.remote(x) for actor in self._actors])
        return self._objective.value_at(x)

    def close(self) -> None:
        """Kill the actors, and shut down a Ray started here."""
        ray = import_ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started:
            ray.shutdown()

    def __enter__(self) -> RayVisits:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_executor(executor: str, actors: int, gpus_per_actor: float = 0) -> None:
    """One-line :class:`UsageError` for an unknown executor or an actor count or GPU share out of range."""
    if executor not in EXECUTORS:
        raise UsageError(f"executor {executor!r} is unknown; allowed: {', '.join(EXECUTORS)}")
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise UsageError(f"actors {actors!r} is not allowed; allowed: an integer >= 1")
    if executor == "local" and actors != 1:
        raise UsageError(f"actors {actors} needs executor 'ray'; allowed with 'local': 1")
    if not (isinstance(gpus_per_actor, (int, float)) and 0 <= gpus_per_actor and math.isfinite(gpus_per_actor)):
        raise UsageError(f"GPUs per actor {gpus_per_actor!r} is not allowed; allowed: a number >= 0 (0.5 shares a GPU)")


def open_visits(qmodel: QuantizedModel, images: torch.Tensor, targets: torch.Tensor, loss: Any, space: str,
                order: str, executor: str = "local", actors: int = 1, address: str | None = None,
                gpus_per_actor: float = 0) -> LocalVisits | RayVisits:
    """The visits of one search, in this process or on Ray; a context manager either way. The settings are
    checked by the caller (:func:`check_executor`): ``search`` does so before any work."""
    if executor == "local":
        return LocalVisits(qmodel, images, targets, loss, space, order)
    return RayVisits(qmodel, images, targets, loss, space, order, actors, address, gpus_per_actor)
