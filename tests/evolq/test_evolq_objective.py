"""BlockObjective: determinism, batching, the prefix cache against full forwards, gradients, memory."""

import numpy as np
import pytest
import torch
from evolq_testing import CLASSES, DEPTH, EMBED, LEVELS_RTOL, TOKENS

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
    again = BlockObjective(qmodel, 4, images, batch_size=BATCH, targets=f.targets)  # recomputes, no memory
    assert again(f.x0) == first


def test_a_point_scored_twice_is_computed_once_and_counted_twice(qmodel, images, monkeypatch):
    f = BlockObjective(qmodel, 3, images, batch_size=BATCH)
    computed = []
    original = f._mean_loss
    monkeypatch.setattr(f, "_mean_loss", lambda: computed.append(1) or original())
    x = near(f.x0, 3)
    assert f.value_at(x) is None
    value = f(x)
    assert f(x.copy()) == value == f.value_at(x)
    assert f(f.x0) != value
    assert (len(computed), f.evaluations) == (2, 3)
    np.testing.assert_array_equal(qmodel.block(3).scales(), f.x0.astype(np.float32))  # scales still follow x


@pytest.mark.parametrize("block", [0, 2, 4])
def test_the_next_visits_x0_equals_this_visits_best_bit_for_bit(qmodel, images, block):
    """What lets the search hand a visit's best loss to the next visit as ``x0_value``."""
    f = BlockObjective(qmodel, block + 1, images, batch_size=BATCH)
    x = near(f.x0, 20 + block)
    best = f(x)
    following = BlockObjective(qmodel, block, images, batch_size=BATCH, targets=f.targets)
    assert following(following.x0) == best
    seeded = BlockObjective(qmodel, block, images, batch_size=BATCH, targets=f.targets, x0_value=best)
    assert seeded(seeded.x0) == best and seeded.evaluations == 1


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
    # Bit for bit (the objective promises a full forward's numbers): the cached prefix is the same
    # tensor the full forward computes, and the suffix the same operations on the same shapes, so
    # on any machine and thread count both round alike.
    assert value == full
    # the block's scales are left at the last point scored, so the objective's own model agrees too
    np.testing.assert_array_equal(qmodel.block(block).scales(), x.astype(np.float32))
    assert model_loss(qmodel, images, f.targets, loss=loss, batch_size=BATCH) == value
    # and the scales matter: moving them 5 % moves quantized logits, hence the loss (by 1e-4 to
    # 1.5e-3 here, 50-800 float32 steps of the loss: no exact equality above could hold by chance)
    assert f(f.x0) != value


def test_targets_are_the_fp_logits_and_can_be_shared(qmodel, images):
    targets = fp_logits(qmodel, images, batch_size=BATCH)
    with qmodel.fp(), torch.no_grad():
        # bit for bit the FP model's forwards on the same batches (one forward of all 100 images
        # would multiply matrices of other shapes: the same within float rounding, not bit for bit)
        assert torch.equal(targets, torch.cat([qmodel(batch) for batch in images.split(BATCH)]))
    assert targets.shape == (N_IMAGES, CLASSES)
    shared = BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=targets)
    own = BlockObjective(qmodel, 1, images, batch_size=BATCH)
    assert shared.targets is targets
    assert shared(shared.x0) == own(own.x0)


def test_value_and_grad(qmodel, images):
    f = BlockObjective(qmodel, 3, images, batch_size=BATCH)
    x = near(f.x0, 3)
    value, grad = f.value_and_grad(x)
    # the gradient pass dequantizes (torch's kernels), f(x) runs on grid levels: equal up to float rounding
    # (2.4e-6 relative on the AVX2 machine)
    assert value == pytest.approx(f(x), rel=LEVELS_RTOL)
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


def test_pass_inputs_are_every_blocks_prefix_and_respect_the_memory_limit(qmodel, images):
    from evolq.visits import pass_inputs

    inputs = pass_inputs(qmodel, images, batch_size=BATCH)
    assert len(inputs) == DEPTH and all(len(block) == N_IMAGES // BATCH for block in inputs)
    for block in (0, 3, DEPTH - 1):
        for b, batch in enumerate(images.split(BATCH)):
            assert torch.equal(inputs[block][b], qmodel.prefix(batch, block))
    one_block = inputs[0][0][0].numel() * 4 * N_IMAGES
    assert pass_inputs(qmodel, images, batch_size=BATCH, limit_bytes=DEPTH * one_block - 1) is None
    assert pass_inputs(qmodel, images, batch_size=BATCH, limit_bytes=DEPTH * one_block) is not None


def test_invalid_value_scores_degenerate_vectors_instead_of_raising(qmodel, images):
    strict = BlockObjective(qmodel, 1, images, batch_size=BATCH)
    zero = strict.x0.copy()
    zero[5] = 0.0
    with pytest.raises(UsageError, match="index 5"):
        strict(zero)
    lenient = BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=strict.targets, invalid_value=np.inf)
    before = qmodel.block(1).scales()
    assert lenient(zero) == np.inf and lenient(-strict.x0) == np.inf
    assert lenient.evaluations == 2
    np.testing.assert_array_equal(qmodel.block(1).scales(), before)
    with pytest.raises(UsageError, match="length"):  # a vector of the wrong length is still the caller's bug
        lenient(strict.x0[:-1])
    assert np.isfinite(lenient(strict.x0))
