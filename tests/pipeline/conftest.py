"""A small calibrated default model shared by the pipeline tests (CPU; one thread: tests/conftest.py)."""

import pytest

import evolq
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
