"""Bad inputs outside the data module: model names, block indices, checkpoints."""

import pickle

import numpy as np
import pytest
import torch

from evolq.errors import RunError, UsageError
from evolq.files import load_tensors, save_tensors
from evolq.models import create_model


def test_error_kinds():
    assert issubclass(UsageError, ValueError) and issubclass(RunError, RuntimeError)


def test_unknown_vit_name_mentions_the_name():
    with pytest.raises(UsageError) as error:
        create_model("vit_nonexistent_xyz")
    message = str(error.value)
    assert "'vit_nonexistent_xyz' is unknown to timm" in message and "allowed" in message


def test_near_miss_name_gets_suggestions():
    with pytest.raises(UsageError, match=r"did you mean .*deit_tiny_patch16_224"):
        create_model("deit_tiny_patch16_22")


@pytest.mark.parametrize("name", ["convnext_tiny", "pit_ti_224", "regnetx_002"])
def test_models_of_other_families_are_not_supported(name):
    with pytest.raises(UsageError, match=rf"model '{name}' is not supported; allowed: default, default-cnn, default-swin, default-levit or a timm name"):
        create_model(name)


def test_tagged_timm_name_is_accepted():
    model = create_model("deit_tiny_patch16_224.fb_in1k", pretrained=False)
    assert model.num_classes == 1000


def test_block_index_out_of_range(calibrated_w4a8):
    qmodel = calibrated_w4a8
    assert qmodel.block(-1) is qmodel.blocks[5] and qmodel.block(0) is qmodel.blocks[0]
    for bad in (99, 6, -7, True, 1.0, "2"):
        with pytest.raises(UsageError) as error:
            qmodel.block(bad)
        assert str(error.value) == f"block index {bad!r} is out of range; allowed: 0..5 (or -6..-1)"


def test_numpy_integer_block_index(calibrated_w4a8):
    assert calibrated_w4a8.block(np.int64(2)) is calibrated_w4a8.blocks[2]


def test_garbage_checkpoint_is_a_run_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(RunError, match="neither a safetensors file nor a weights-only torch file") as error:
        load_tensors(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_safetensors_is_a_run_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.randn(64, 64), "b": torch.randn(64)})
    assert load_tensors(path)["w"].shape == (64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="corrupted, truncated"):
        load_tensors(path)


def test_missing_checkpoint_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(RunError, match="does not exist"):
        create_model("default", checkpoint=str(tmp_path / "nope.safetensors"))


class Payload:
    """Unpickling this runs code: it must never happen for a checkpoint."""

    def __reduce__(self):
        return (open, (str(Payload.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_objects_are_refused_not_executed(tmp_path):
    Payload.marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": Payload()}, handle)
    with pytest.raises(RunError):
        load_tensors(path)
    assert not Payload.marker.exists()


def test_weights_only_torch_files_load(tmp_path):
    tensors = {"a": torch.arange(4.0)}
    torch.save(tensors, tmp_path / "plain.pt")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    assert torch.equal(load_tensors(tmp_path / "plain.pt")["a"], tensors["a"])
    assert torch.equal(load_tensors(tmp_path / "wrapped.pt")["a"], tensors["a"])
    with pytest.raises(RunError, match="does not hold a dict of tensors"):
        load_tensors(tmp_path / "list.pt")


def test_checkpoint_of_another_architecture(tmp_path):
    save_tensors(tmp_path / "other.safetensors", {"not.a.vit.weight": torch.zeros(2)})
    with pytest.raises(UsageError, match="does not fit 'deit_tiny_patch16_224'"):
        create_model("deit_tiny_patch16_224", checkpoint=str(tmp_path / "other.safetensors"))
