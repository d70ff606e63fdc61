"""BlockObjective: determinism, batching, the prefix cache against full forwards, gradients, memory."""

import numpy as np
import pytest
import torch
from evolq_testing import CLASSES, DEPTH, EMBED, TOKENS

from evolq.errors import UsageError
from evolq.objective import BlockObjective, fp_logits, model_loss

N_IMAGES, BATCH = 100, 50


@pytest.fixture(scope="module")
def images(calib_images):
    return calib_images[:N_IMAGES]


def near(x0, seed, spread=0.05):
    """A random positive vector within +-spread (relative) of x0."""
    return x0 * (1 + spread * np.random.default_rng(seed).uniform(-1, 1, x0.size))


def test_same_point_twice_is_bit_identical(qmodel, images):
    f = BlockObjective(qmodel, 4, images, batch_size=BATCH)
    first = f(f.x0)
    assert isinstance(first, float) and np.isfinite(first)
    f(near(f.x0, 0))
    assert f(f.x0) == first
    assert f(f.x0.copy()) == first


def test_batch_matches_repeated_calls_and_counts_evaluations(qmodel, images):
    f = BlockObjective(qmodel, 5, images, batch_size=BATCH)
    assert f.evaluations == 0 and f.dim == 4 * EMBED
    points = np.stack([f.x0, near(f.x0, 1), near(f.x0, 2, 0.2)])
    singles = np.array([f(x) for x in points])
    assert f.evaluations == 3
    batch = f.batch(points)
    assert f.evaluations == 6
    assert batch.shape == (3,) and batch.dtype == np.float64
    np.testing.assert_array_equal(batch, singles)
    assert len(set(singles.tolist())) == 3  # the points do score differently
    assert f.batch(f.x0).shape == (1,) and f.evaluations == 7
    f.value_and_grad(f.x0)
    assert f.evaluations == 8


@pytest.mark.parametrize("block, loss", [(0, "infonce"), (3, "infonce"), (5, "infonce"), (-1, "mse"), (2, "kl")])
def test_cached_prefix_equals_a_full_forward(fresh_qmodel, images, block, loss):
    qmodel, reference = fresh_qmodel(), fresh_qmodel()
    f = BlockObjective(qmodel, block, images, loss=loss, batch_size=BATCH)
    x = near(f.x0, 10 + block)
    value = f(x)
    reference.block(block).set_scales(x)
    full = model_loss(reference, images, f.targets, loss=loss, batch_size=BATCH)
    assert value == pytest.approx(full, abs=1e-5)
    # the block's scales are left at the last point scored, so the objective's own model agrees too
    np.testing.assert_array_equal(qmodel.block(block).scales(), x.astype(np.float32))
    assert model_loss(qmodel, images, f.targets, loss=loss, batch_size=BATCH) == pytest.approx(value, abs=1e-5)
    # and the scales matter by far more than the tolerance
    assert abs(f(f.x0) - value) > 1e-4


def test_targets_are_the_fp_logits_and_can_be_shared(qmodel, images):
    targets = fp_logits(qmodel, images, batch_size=BATCH)
    with qmodel.fp(), torch.no_grad():
        torch.testing.assert_close(targets, qmodel(images), rtol=0, atol=0)
    assert targets.shape == (N_IMAGES, CLASSES)
    shared = BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=targets)
    own = BlockObjective(qmodel, 1, images, batch_size=BATCH)
    assert shared.targets is targets
    assert shared(shared.x0) == own(own.x0)


def test_value_and_grad(qmodel, images):
    f = BlockObjective(qmodel, 3, images, batch_size=BATCH)
    x = near(f.x0, 3)
    value, grad = f.value_and_grad(x)
    assert value == pytest.approx(f(x), abs=1e-6)
    assert grad.shape == (f.dim,) and grad.dtype == np.float64
    assert np.isfinite(grad).all()
    assert np.count_nonzero(grad) > f.dim // 2  # qkv and proj channels both get gradient
    assert np.abs(grad[: 3 * EMBED]).max() > 0 and np.abs(grad[3 * EMBED :]).max() > 0
    assert all(layer.scale_override is None for layer in f.block.layers)
    np.testing.assert_array_equal(f.block.scales(), x.astype(np.float32))
    again_value, again = f.value_and_grad(x)
    assert again_value == value
    np.testing.assert_array_equal(again, grad)
    _, elsewhere = f.value_and_grad(near(f.x0, 4, 0.2))
    assert not np.array_equal(elsewhere, grad)


def test_cache_bytes_are_the_block_inputs_and_targets(qmodel, images):
    f = BlockObjective(qmodel, 2, images, batch_size=BATCH)
    assert f.cache_bytes == N_IMAGES * TOKENS * EMBED * 4 + N_IMAGES * CLASSES * 4
    assert len(f._inputs) == N_IMAGES // BATCH


def test_negative_block_index_and_block_objects(qmodel, images):
    by_index = BlockObjective(qmodel, DEPTH - 1, images, batch_size=BATCH)
    by_negative = BlockObjective(qmodel, -1, images, batch_size=BATCH)
    by_object = BlockObjective(qmodel, qmodel.block(DEPTH - 1), images, batch_size=BATCH)
    assert by_negative.block is by_index.block is by_object.block
    assert by_index(by_index.x0) == by_negative(by_negative.x0) == by_object(by_object.x0)


def test_bad_inputs_to_the_objective(qmodel, images):
    f = BlockObjective(qmodel, 0, images, batch_size=BATCH)
    with pytest.raises(UsageError, match=f"length {f.dim}"):
        f(f.x0[:10])
    x = f.x0.copy()
    x[4] = np.nan
    with pytest.raises(UsageError, match="nan at index 4"):
        f(x)
    with pytest.raises(UsageError, match="loss 'l1' is unknown"):
        BlockObjective(qmodel, 0, images, loss="l1")
    with pytest.raises(UsageError, match="block index 6 is out of range"):
        BlockObjective(qmodel, 6, images)


def test_objective_on_an_uncalibrated_model_says_calibrate_first(fp_model, images):
    from evolq.qmodel import QuantizedModel

    with pytest.raises(UsageError, match="calibrat"):
        BlockObjective(QuantizedModel(fp_model, "w4a8"), 0, images[:10], batch_size=10)
