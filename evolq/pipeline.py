"""The Evol-Q pipeline behind ``evolq quantize``: calibrate, evaluate, search, evaluate, save.

A run folder holds ``result.json`` (numbers, config, versions), ``history.csv`` (one row per
objective evaluation), ``scales.safetensors`` (every quantizer's scale and zero point) and,
while the search runs, ``checkpoint.safetensors`` for ``--resume``. All are written atomically.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from evolq.allocator import reuse_freed_memory
from evolq.data import load_data, stack
from evolq.errors import UsageError
from evolq.evaluate import top1
from evolq.files import load_tensors, read_json, save_tensors, sha256, writable_folder, write_json, write_text
from evolq.losses import get_loss
from evolq.models import create_model
from evolq.objective import fp_logits, model_loss
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.search import check_search_settings, default_select_by, parallel_options, search
from evolq.visits import check_executor

DEMO_PRESET = "w3a4"
LEGACY_PLACEMENT = "inputs"  # what runs recorded before the setting existed were quantized with
PACKAGES = ("evolq", "torch", "timm", "numpy", "nevergrad", "cma")
# Settings that do not change a run's numbers, so --resume accepts a change of them.
NOT_IN_FINGERPRINT = ("device", "threads", "progress", "reuse_freed_memory", "executor", "actors", "address",
                      "gpus_per_actor")


@dataclass
class RunConfig:
    """Everything that defines an ``evolq quantize`` run; recorded in ``result.json``."""

    model: str = "default"
    checkpoint: str | None = None
    pretrained: bool = False
    data: str = "fmnist"
    data_dir: str | None = None
    preset: str = DEMO_PRESET
    wbits: int | None = None
    abits: int | None = None
    input_bits: int | None = None  # the image's quantizer; None: abits (QuantConfig.input_bits)
    placement: str = "full"
    calib_size: int = 1000
    selection_size: int = 1000
    eval_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    reuse_freed_memory: bool = False  # opt-in, process-wide: see evolq.allocator
    optimizer: str = "evolq"
    passes: int = 10
    evaluations_per_block: int = 4
    loss: str = "infonce"
    order: str = "reverse"
    search_space: str = "paper"
    coordinates: str | None = None  # None: the space's default (evolq.search.default_coordinates)
    select_by: str | None = None  # None: the space's default (evolq.search.default_select_by)
    candidates_per_step: int | None = None  # None: as many as actors
    executor: str = "local"  # or "ray": the search's candidates scored on model replicas (evolq.visits)
    actors: int = 1
    address: str | None = None
    gpus_per_actor: float = 0

    def candidates(self) -> int:
        """Candidates the optimizer proposes together: as set, else one per actor."""
        return self.actors if self.candidates_per_step is None else self.candidates_per_step

    def quant_config(self) -> QuantConfig:
        base = QuantConfig.preset(self.preset)
        return base.with_(wbits=base.wbits if self.wbits is None else self.wbits,
                          abits=base.abits if self.abits is None else self.abits, placement=self.placement,
                          input_bits=self.input_bits)

    def check(self) -> None:
        """Fail on a bad setting now, with one line, rather than after minutes of calibration."""
        self.quant_config()
        get_loss(self.loss)
        if self.optimizer != "none" and self.selection_size < 1:
            raise UsageError(f"selection size {self.selection_size} is not allowed; allowed: a positive number of "
                             "images (the search picks its best pass on them)")
        check_search_settings(self.passes, self.evaluations_per_block, self.order,
                              None if self.optimizer == "none" else self.optimizer, space=self.search_space,
                              coordinates=self.coordinates, select_by=self.select_by)
        check_executor(self.executor, self.actors, self.gpus_per_actor)
        if self.optimizer != "none":
            parallel_options(self.optimizer, {}, self.candidates())
        if self.eval_size is not None and (isinstance(self.eval_size, bool) or not isinstance(self.eval_size, int)
                                           or self.eval_size < 1):
            raise UsageError(f"eval size {self.eval_size!r} is not allowed; allowed: an integer >= 1 "
                             "(or none for the whole evaluation split)")

    @classmethod
    def from_result(cls, path: str | Path) -> "RunConfig":
        """The config recorded in a run's ``result.json`` (``evolq quantize --config``)."""
        recorded = read_json(path).get("config")
        if not isinstance(recorded, dict):
            raise UsageError(f"file {str(path)!r} has no 'config'; allowed: a result.json written by evolq")
        known = {f.name for f in fields(cls)}
        return cls(**{"placement": LEGACY_PLACEMENT, **{k: v for k, v in recorded.items() if k in known}})

    def with_absolute_paths(self) -> "RunConfig":
        """The same run with its checkpoint and data paths absolute, so ``--config`` works from any folder."""
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().resolve())

        return replace(self, checkpoint=absolute(self.checkpoint), data_dir=absolute(self.data_dir),
                       data=self.data if self.data == "fmnist" else absolute(self.data))

    def fingerprint(self) -> dict:
        """The settings that decide a run's numbers: what ``--resume`` must find unchanged."""
        settings = {k: v for k, v in asdict(self).items() if k not in NOT_IN_FINGERPRINT}
        return dict(settings, candidates_per_step=self.candidates(),
                    select_by=self.select_by or default_select_by(self.search_space))


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is unknown; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} is not available on this machine; allowed: cpu")
    return device


def _to(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


@dataclass
class Prepared:
    """A calibrated quantized model with its data, ready to search, slice or evaluate."""

    config: RunConfig
    device: torch.device
    qmodel: QuantizedModel
    calib_images: torch.Tensor
    selection: tuple[torch.Tensor, torch.Tensor]
    evaluation: torch.utils.data.Dataset

    def top1(self, desc: str = "evaluate", progress: bool = True) -> float:
        return top1(self.qmodel, self.evaluation, progress=progress, desc=desc, device=self.device)


def first(dataset: torch.utils.data.Dataset, count: int | None) -> torch.utils.data.Dataset:
    """The first ``count`` items of ``dataset`` (all of it for None)."""
    return dataset if count is None else Subset(dataset, range(min(count, len(dataset))))


def evaluation_set(config: RunConfig, model: torch.nn.Module, eval_size: int | None = None) -> torch.utils.data.Dataset:
    """The evaluation images of the run ``config`` (its first ``eval_size``, or the run's own count, if set)."""
    splits = load_data(config.data, model, config.calib_size, config.selection_size, config.seed, config.data_dir)
    return first(splits.evaluation, config.eval_size if eval_size is None else eval_size)


def run_model(config: RunConfig) -> torch.nn.Module:
    """The run's full-precision model. Random weights (a timm name without checkpoint or ``pretrained``)
    are drawn from the run's seed, so a run rebuilt later (:func:`load_quantized`) has the same ones."""
    torch.manual_seed(config.seed)
    return create_model(config.model, config.checkpoint, config.pretrained)


def prepare(config: RunConfig, progress: bool = True) -> Prepared:
    """Model, data splits and a calibrated :class:`QuantizedModel` for ``config``."""
    device = _device(config.device)
    quant_config = config.quant_config()
    if config.reuse_freed_memory:
        reuse_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)
    model = run_model(config)
    splits = load_data(config.data, model, config.calib_size, config.selection_size, config.seed, config.data_dir)
    evaluation = first(splits.evaluation, config.eval_size)
    calib_images, labels = stack(splits.calib)
    # An empty selection split (landscape loss slices need none) keeps the images' shape.
    chosen = stack(splits.selection) if len(splits.selection) else (calib_images[:0], labels[:0])
    calib_images, *selection = _to(device, calib_images, *chosen)
    qmodel = QuantizedModel(model, quant_config).to(device).calibrate(calib_images, progress=progress)
    return Prepared(config, device, qmodel, calib_images, tuple(selection), evaluation)


def run_quantize(config: RunConfig, out: str | Path | None = None, resume: bool = False,
                 progress: bool = True) -> dict:
    """Run the pipeline; returns the ``result.json`` content (also written to ``out`` if given)."""
    started = time.time()
    config.check()
    config = config.with_absolute_paths()
    if out is not None:
        writable_folder(Path(out))
    prepared = prepare(config, progress)
    qmodel, calib_images = prepared.qmodel, prepared.calib_images

    def accuracy(desc: str) -> float:
        return prepared.top1(desc, progress)

    with qmodel.fp():
        fp_top1 = accuracy("FP top-1")
    ptq_top1 = accuracy("PTQ top-1")
    targets = fp_logits(qmodel, calib_images)
    calib_loss_ptq = model_loss(qmodel, calib_images, targets, config.loss)
    result = dict(
        fp_top1=fp_top1, ptq_top1=ptq_top1, final_top1=ptq_top1,
        calib_loss_ptq=calib_loss_ptq, calib_loss_final=calib_loss_ptq,
        selection_loss=None, best_pass=0, evaluations=0,
    )
    history = None
    result.update(config=asdict(config), quant_config=qmodel.config.to_dict(), versions=versions(),
                  device=str(prepared.device))
    if config.checkpoint is not None:
        result["checkpoint_sha256"] = sha256(config.checkpoint)
    if config.optimizer != "none":
        try:
            found = search(
                qmodel, calib_images, prepared.selection, optimizer=config.optimizer, passes=config.passes,
                evaluations_per_block=config.evaluations_per_block, order=config.order, loss=config.loss,
                seed=config.seed, checkpoint_dir=out, resume=resume, fingerprint=config.fingerprint(),
                progress=progress, space=config.search_space, coordinates=config.coordinates,
                select_by=config.select_by, candidates_per_step=config.candidates(), executor=config.executor,
                actors=config.actors, address=config.address, gpus_per_actor=config.gpus_per_actor,
            )
        except KeyboardInterrupt:
            if out is not None:
                write_json(Path(out) / "result.json", dict(result, complete=False, wall_s=round(time.time() - started, 2)))
            raise
        history = found.history
        result.update(
            final_top1=accuracy("searched top-1"), calib_loss_final=found.calib_loss,
            selection_loss=found.selection_loss, selection_top1=found.selection_top1,
            best_pass=found.best_pass, evaluations=found.evaluations, passes=found.passes,
        )
    result.update(wall_s=round(time.time() - started, 2), complete=True)
    if out is not None:
        save_run(Path(out), qmodel, result, history)
    return result


def save_run(out: Path, qmodel: QuantizedModel, result: dict, history) -> None:
    save_tensors(out / "scales.safetensors", qmodel.quant_state())
    if history is not None:
        write_text(out / "history.csv", history.to_csv(index=False))
    write_json(out / "result.json", result)


def load_quantized(folder: str | Path) -> QuantizedModel:
    """Rebuild the quantized model of a finished run from its ``result.json`` and ``scales.safetensors``."""
    folder = Path(folder)
    result = read_json(folder / "result.json")
    config = RunConfig.from_result(folder / "result.json")
    qmodel = QuantizedModel(run_model(config), QuantConfig(**{"placement": LEGACY_PLACEMENT, **result["quant_config"]}))
    return qmodel.load_quant_state(load_tensors(folder / "scales.safetensors"))
