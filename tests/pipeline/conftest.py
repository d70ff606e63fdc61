"""A small calibrated default model shared by the pipeline tests (CPU; one thread: tests/conftest.py)."""

import pytest

import evolq
from evolq.checkpoint import SearchCheckpoint
from evolq.data import load_fmnist

CALIB, SELECTION = 200, 200


@pytest.fixture(scope="session")
def fmnist_train():
    images, labels = load_fmnist("train")
    return images[:2000], labels[:2000]


@pytest.fixture()
def qmodel_w4a8(fmnist_train):
    images, _ = fmnist_train
    return evolq.QuantizedModel(evolq.load_default(), "w4a8").calibrate(images[:CALIB], progress=False)


@pytest.fixture()
def data(fmnist_train):
    images, labels = fmnist_train
    return images[:CALIB], (images[CALIB : CALIB + SELECTION], labels[CALIB : CALIB + SELECTION])


@pytest.fixture()
def interrupt_after(monkeypatch):
    """``interrupt_after(n)``: a search's ``n``-th checkpoint save is written, then raises KeyboardInterrupt
    (``monkeypatch.undo()`` restores plain saves)."""
    def arm(saves: int) -> None:
        original, count = SearchCheckpoint.save, {"n": 0}

        def save_then_stop(self, *args, **kwargs):
            original(self, *args, **kwargs)
            count["n"] += 1
            if count["n"] == saves:
                raise KeyboardInterrupt

        monkeypatch.setattr(SearchCheckpoint, "save", save_then_stop)

    return arm
