"""The trained default model (skipped until evolq/zoo/fmnist_vit.safetensors exists)."""

import torch
from torch.utils.data import Subset, TensorDataset

from evolq.data import load_fmnist, make_splits, stack
from evolq.evaluate import top1
from evolq.qmodel import QuantizedModel


def test_default_model_w8a8_within_1_point_of_fp(trained_model):
    train = TensorDataset(*load_fmnist("train"))
    test = TensorDataset(*load_fmnist("test"))
    calib = make_splits(train, test, calib_size=500, selection_size=1, seed=0).calib  # as the pipeline draws it
    calib_images, _ = stack(calib)
    assert calib_images.shape == (500, 1, 28, 28)
    evaluation = Subset(test, range(2000))
    qmodel = QuantizedModel(trained_model, "w8a8").calibrate(calib_images, batch_size=100, progress=False)
    fp_top1 = top1(trained_model, evaluation, progress=False)
    assert fp_top1 > 80.0, f"FP top-1 {fp_top1:.2f}%: not a trained model"
    quant_top1 = top1(qmodel, evaluation, progress=False)
    assert quant_top1 >= fp_top1 - 1.0, f"w8a8 {quant_top1:.2f}% vs FP {fp_top1:.2f}%"
    with torch.inference_mode():
        assert not torch.equal(qmodel(calib_images[:8]), trained_model(calib_images[:8]))
