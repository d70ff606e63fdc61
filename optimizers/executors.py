"""Where the cells of a comparison grid run: in this process, in worker processes, or on Ray.

An executor has one method, ``map_unordered(fn, items)``, yielding ``(item, fn(item))``
pairs as they finish. ``fn`` and the items must pickle (module-level functions and
classes, ``functools.partial``) for every executor but the sequential one. The caller
owns ordering, deduplication and saving; an executor only runs things.

- ``local``: ``workers=1`` runs the items one after another in this process (easiest to
  debug, nothing to pickle); ``workers=N > 1`` uses a ``ProcessPoolExecutor`` of N
  processes started with ``spawn`` (safe next to threads and CUDA, same on every OS).
- ``ray``: one Ray task per item (``pip install 'evolq[distributed]'``). ``address`` joins
  an existing cluster (``"auto"`` or ``"ray://host:10001"``); without one, a Ray already
  started in this process is used, or a local one with ``num_cpus=workers`` is started
  and shut down afterwards. Tasks lost with a worker or node are retried up to
  ``retries`` times by Ray; an exception raised by ``fn`` itself is not retried.

The other way to use Ray is inside one search rather than across cells: actors that each
hold one model replica and score candidates. :class:`RayBatchEvaluator` builds such a pool
from an objective factory and is itself an objective whose ``batch`` splits the candidates
over the actors, so any optimizer that asks for a population evaluates it in parallel.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

import numpy as np

from optimizers.base import InputError

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
RAY_MISSING = "the 'ray' executor needs Ray: pip install 'evolq[distributed]'"


class Executor(Protocol):
    """Runs ``fn`` on each item and yields ``(item, result)`` in completion order."""

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]: ...


class LocalExecutor:
    """Sequential in this process (``workers=1``) or a spawn-started process pool."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise InputError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """Yield ``(item, fn(item))``; an exception in ``fn`` stops the run and cancels the rest."""
        if self.workers == 1:
            for item in items:
                yield item, fn(item)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
            pending = {pool.submit(fn, item): item for item in items}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            finally:
                for future in pending:
                    future.cancel()


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_MISSING) from error
    return ray


def ensure_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address``, reuse a running Ray, or start a local one; True if started here."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


class RayExecutor:
    """One Ray task per item.

    ``num_gpus`` is what each task reserves; ``None`` reserves one GPU per task where the
    cluster has GPUs and none elsewhere. A fraction (``0.25``) lets tasks share a GPU.
    """

    def __init__(self, workers: int = 1, address: str | None = None, retries: int = 2, num_gpus: float | None = None):
        import_ray()  # fail before any work is done
        if workers < 1 or retries < 0:
            raise InputError(f"ray executor needs workers >= 1 and retries >= 0, got {workers}, {retries}")
        self.workers, self.address, self.retries, self.num_gpus = workers, address, retries, num_gpus

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """Submit every item as a task and yield results as they arrive; shuts down a Ray it started."""
        ray = import_ray()
        started = ensure_ray(self.address, self.workers)
        pending: dict = {}
        try:
            gpus = self.num_gpus
            if gpus is None:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=self.retries)(fn)
            pending = {task.remote(item): item for item in items}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item = pending.pop(ref)
                    yield item, ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)
            if started:
                ray.shutdown()


def make_executor(name: str, workers: int = 1, address: str | None = None, retries: int = 2) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`); ``retries`` and ``address`` are Ray's."""
    if name == "local":
        if address is not None:
            raise InputError(f"address={address!r} needs executor='ray'; the 'local' executor runs here")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers=workers, address=address, retries=retries)
    raise InputError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")


class _ObjectiveActor:
    """Body of one Ray actor: builds the objective once and scores batches with it."""

    def __init__(self, factory: Callable[[], Callable]):
        self.objective = factory()

    def x0(self) -> np.ndarray | None:
        return getattr(self.objective, "x0", None)

    def batch(self, X: np.ndarray) -> np.ndarray:
        batch = getattr(self.objective, "batch", None)
        if batch is not None:
            return np.asarray(batch(X), dtype=float)
        return np.array([float(self.objective(x)) for x in X])


def batch_on_actors(actors: list, X: Any) -> np.ndarray:
    """The values of the rows of ``X``, split in order into one contiguous chunk per actor, each scored by
    that actor's ``batch`` method in parallel, and returned in the order of ``X``."""
    chunks = [chunk for chunk in np.array_split(np.asarray(X, dtype=float), len(actors)) if len(chunk)]
    return np.concatenate(import_ray().get([actor.batch.remote(chunk) for actor, chunk in zip(actors, chunks)]))


class RayBatchEvaluator:
    """An objective whose evaluations run on a pool of Ray actors, one objective replica each.

    ``factory`` is a zero-argument, picklable callable returning the objective (for a model,
    it loads the model once per actor: that is the point of actors over tasks).
    ``evaluator.batch(X)`` splits the rows of ``X`` into ``actors`` contiguous chunks, scores
    them in parallel and returns the values in the order of ``X``; ``evaluator(x)`` scores one
    point on the first actor; ``evaluator.x0`` is the replicas' ``x0`` if they have one.
    ``num_cpus``/``num_gpus`` are reserved per actor. Call :meth:`close` (or use ``with``)
    to release the actors and a Ray started here.
    """

    def __init__(
        self,
        factory: Callable[[], Callable],
        actors: int = 2,
        num_cpus: float = 1,
        num_gpus: float = 0,
        address: str | None = None,
    ):
        if actors < 1:
            raise InputError(f"actors must be at least 1, got {actors}")
        self._ray = import_ray()
        self._started = ensure_ray(address, None)
        actor_class = self._ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_ObjectiveActor)
        self._actors = [actor_class.remote(factory) for _ in range(actors)]
        self.x0 = self._ray.get(self._actors[0].x0.remote())

    def __call__(self, x: np.ndarray) -> float:
        """Value at one point."""
        return float(self.batch(np.asarray(x, dtype=float).reshape(1, -1))[0])

    def batch(self, X: np.ndarray) -> np.ndarray:
        """Values at the rows of ``X``, computed in parallel across the actors."""
        return batch_on_actors(self._actors, X)

    def close(self) -> None:
        """Kill the actors, and shut down Ray if this evaluator started it."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()

    def __enter__(self) -> RayBatchEvaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
