"""Losses between the quantized model's logits and the full-precision model's logits.

Each takes ``(quant_logits, fp_logits)`` of one calibration batch and returns a scalar tensor.
``infonce`` is Evol-Q's: each quantized output must pick its own FP output out of the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from evolq.errors import UsageError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
INFONCE_TEMPERATURE = 3.0


def infonce(quant: torch.Tensor, fp: torch.Tensor, temperature: float = INFONCE_TEMPERATURE) -> torch.Tensor:
    """``2T * CE(normalize(q) @ normalize(k).T / T, arange(N))`` with ``T = 3`` (Evol-Q)."""
    q, k = F.normalize(quant, dim=-1), F.normalize(fp, dim=-1)
    logits = q @ k.T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def mse(quant: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the logits."""
    return F.mse_loss(quant, fp)


def kl(quant: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """KL(FP || quantized) of the softmax distributions, averaged over the batch."""
    return F.kl_div(F.log_softmax(quant, dim=-1), F.log_softmax(fp, dim=-1), log_target=True, reduction="batchmean")


def cosine(quant: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """One minus the mean cosine similarity of the logit vectors."""
    return 1 - F.cosine_similarity(quant, fp, dim=-1).mean()


LOSSES: dict[str, Loss] = {"infonce": infonce, "mse": mse, "kl": kl, "cosine": cosine}


def get_loss(name: str | Loss) -> Loss:
    """A loss by name (or a callable passed through)."""
    if callable(name):
        return name
    if name not in LOSSES:
        raise UsageError(f"loss {name!r} is unknown; allowed: {', '.join(LOSSES)}")
    return LOSSES[name]
