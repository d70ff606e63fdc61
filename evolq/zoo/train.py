"""``evolq train-default``: train an embedded model from a seed into a run folder, resumable after every epoch.

``--model`` names the embedded model (``default``, ``default-cnn``, ...; :data:`evolq.zoo.ZOO`).
The folder receives the checkpoint and its model card under the embedded files' names; the
checkpoint loads with ``--model NAME --checkpoint FOLDER/<file>.safetensors``. The embedded
model is never overwritten: replacing it is a deliberate copy into ``evolq/zoo/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evolq.data import fmnist_for, stack
from evolq.evaluate import top1
from evolq.files import atomic_path, save_tensors, sha256, write_json
from evolq.zoo import zoo_model


def default_out(model_name: str) -> str:
    """Where ``evolq train-default --model NAME`` trains unless told: ``runs/train-NAME``."""
    return f"runs/train-{model_name}"


@dataclass
class Recipe:
    """Training recipe of the default model; recorded in its model card."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    crop_padding: int = 2
    seed: int = 0


def _augment(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after padding with the background value, and a random horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, [padding] * 4, value=float(images.amin()))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def train_default(recipe: Recipe = Recipe(), out: str | Path | None = None, data_dir: str | None = None,
                  model_name: str = "default") -> dict:
    """Train the embedded model ``model_name``; write ``out/<file>.safetensors`` and its model card ``out/<file>.json``.

    ``out/state.pt`` keeps the training state after every epoch; a run finds it and resumes.
    ``out`` defaults to :func:`default_out`. Returns the model card, with the checkpoint's path under
    ``checkpoint``.
    """
    entry = zoo_model(model_name)
    torch.manual_seed(recipe.seed)
    out = Path(default_out(model_name) if out is None else out)
    state_file, checkpoint, card = out / "state.pt", out / entry.checkpoint.name, out / entry.card.name
    model = entry.architecture()
    train_x, train_y = stack(fmnist_for(model, "train", data_dir))  # at the model's input size
    test_x, test_y = stack(fmnist_for(model, "test", data_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))),  # 1 epoch: no cosine part
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    start_epoch, log = 0, []
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start_epoch, log = int(state["epoch"]), list(state["log"])
    started = time.time()
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False)
        for step in bar:
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            images = _augment(train_x[index], recipe.crop_padding, generator)
            loss = F.cross_entropy(model(images), train_y[index], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        accuracy = top1(model.eval(), (test_x, test_y))
        log.append(accuracy)
        print(f"epoch {epoch + 1}/{recipe.epochs}: test top-1 {accuracy:.2f}%", flush=True)
        with atomic_path(state_file) as tmp:
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                            generator=generator.get_state(), epoch=epoch + 1, log=log), tmp)
    save_tensors(checkpoint, model.state_dict())
    info = dict(
        name=f"evolq {entry.file}",
        model=entry.name,
        architecture=entry.architecture_record(),
        input_size=list(entry.input_size),
        parameters=sum(p.numel() for p in model.parameters()),
        recipe=asdict(recipe),
        data=f"Fashion-MNIST train ({len(train_x):,} images), evaluated on the {len(test_x):,} test images",
        test_top1=round(log[-1], 2),
        test_top1_per_epoch=[round(a, 2) for a in log],
        train_seconds_this_session=round(time.time() - started, 1),
        torch=torch.__version__,
        sha256=sha256(checkpoint),
        command=f"evolq train-default --model {entry.name} --epochs {recipe.epochs} --seed {recipe.seed}",
    )
    write_json(card, info)
    return dict(info, checkpoint=str(checkpoint))
