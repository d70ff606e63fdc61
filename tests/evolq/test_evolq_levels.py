"""The fast arithmetic of the quantized model: grid levels with the scales on the GEMMs, chunked blocks, grids.

Every fast path is checked against the plain formulation (``QuantizedModel.dequantized``: every
quantizer dequantizes, as fake quantization and the released Evol-Q code compute) on the same
scales, within float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evolq_testing import CALIB_BATCH, DEPTH, LEVELS_RTOL, assert_only_neighbouring_levels, infonce_shift_bound
from timm.models.vision_transformer import VisionTransformer

import evolq.quant.attention
import evolq.quant.layers
from evolq.losses import infonce
from evolq.objective import BlockObjective, model_loss
from evolq.qmodel import QuantizedModel
from evolq.quant import kernels
from evolq.quant.attention import QAttention
from evolq.quant.bits import BitType
from evolq.quant.layers import QLayerNorm, QMlp
from evolq.quant.observers import MinMaxObserver
from evolq.quant.quantizer import UniformQuantizer


@pytest.fixture(scope="module")
def images(calib_images):
    return calib_images[:100]


def near(x0, seed, spread=0.05):
    return x0 * (1 + spread * np.random.default_rng(seed).uniform(-1, 1, x0.size))


@pytest.fixture
def counted(monkeypatch):
    """Calls of the two level kernels: what shows that the fast path actually ran."""
    calls = {"linear": 0, "bmm": 0}

    def wrap(module, name, key):
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    wrap(evolq.quant.layers, "linear_on_levels", "linear")
    wrap(evolq.quant.attention, "scaled_bmm", "bmm")
    return calls


@pytest.mark.parametrize("block", [0, 3, DEPTH - 1])
def test_block_objective_on_levels_equals_the_dequantized_model(qmodel, images, block, counted):
    f = BlockObjective(qmodel, block, images, batch_size=50)
    step = qmodel.model.head.output_quant.step()
    for seed in range(2):
        x = near(f.x0, 100 * block + seed)
        value = f(x)
        with torch.inference_mode():  # the logits f(x) scored: a full forward's, batch by batch (bit for bit)
            logits = torch.cat([qmodel(batch) for batch in images.split(50)])
        ran = dict(counted)
        with qmodel.dequantized():
            plain = model_loss(qmodel, images, f.targets, batch_size=50)
            with torch.inference_mode():
                plain_logits = torch.cat([qmodel(batch) for batch in images.split(50)])
        assert counted == ran  # nothing on levels inside dequantized()
        # the same quantized model but for levels that float rounding moved, and the loss by no more than
        # those logits allow (1e-6 to 2e-5 relative on the machines and paths tried)
        assert_only_neighbouring_levels(logits, plain_logits, step)
        assert abs(value - plain) <= infonce_shift_bound(logits, plain_logits, plain, batch=50)
    blocks_run = DEPTH - block
    assert ran["linear"] >= 2 * 4 * blocks_run and ran["bmm"] >= 2 * 2 * blocks_run  # qkv, proj, fc1, fc2; two bmm


def small_deit(seed: int = 0) -> VisionTransformer:
    """DeiT's layout at toy size: 3 channels, 3 heads, the class token, 1/sqrt(fan_in) weights."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48, depth=2,
                              num_heads=3, mlp_ratio=4.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5)
    return model.eval()


@pytest.mark.parametrize("preset, softmax, placement", [
    ("w4a8", "uniform", "inputs"), ("w3a4", "uniform", "inputs"), ("w4a8", "log2", "inputs"),
    ("w4a8", "uniform", "full"), ("w3a4", "uniform", "full"),
])
def test_attention_on_levels_equals_its_dequantized_form(preset, softmax, placement, counted):
    from evolq.quant.config import QuantConfig

    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    config = QuantConfig.preset(preset, softmax=softmax, softmax_bits=4 if softmax == "log2" else 8,
                                placement=placement)
    qmodel = QuantizedModel(small_deit(), config).calibrate(images, batch_size=20, progress=False)
    attn = qmodel.model.blocks[1].attn
    if placement == "inputs":
        zero_points = {int(q.zero_point) for q in (attn.q_quant, attn.k_quant, attn.v_quant)}
        assert len(zero_points) > 1  # q, k and v each round on their own grid in the one pass
    else:  # one grid for the whole qkv output, and the scores rounded before the softmax
        assert attn.qkv_quant.calibrated and attn.score_quant.calibrated
    with torch.inference_mode():
        x = qmodel.model.blocks[1].norm1(qmodel.prefix(images, 1))
        before = counted["bmm"]
        fast = attn(x.clone())  # attention owns its input (a LayerNorm output) and rounds it in place
        assert counted["bmm"] == before + 2  # q @ k.T and attn @ v, each with its scales on the GEMM
        with qmodel.dequantized():
            plain = attn(x.clone())
        logits = qmodel(images)
        with qmodel.dequantized():
            plain_logits = qmodel(images)
    assert counted["bmm"] == before + 2 + 2 * 2  # the two blocks of the whole forward; none when dequantized
    # Equal within float rounding, but where that rounding moved a q, k or v value (or, on the coarse
    # log2 grid, a probability) onto the neighbouring level: a few rows (measured: up to 0.26 % of the
    # outputs, and a mean difference 6e-5 of the mean output, with torch, MKL and the kernels on their
    # AVX-512, AVX2 and SSE paths, one thread or two; a statistical bound, allowed 1 % and 1e-3).
    close = (fast - plain).abs() <= LEVELS_RTOL * plain.abs().max()
    assert close.float().mean() >= 0.99, f"{int((~close).sum())} of {close.numel()} outputs differ"
    assert (fast - plain).abs().mean() < 1e-3 * plain.abs().mean()
    assert fast.abs().max() > 0.1  # and the comparison is not vacuous
    assert_only_neighbouring_levels(logits, plain_logits, qmodel.model.head.output_quant.step())


@pytest.fixture(scope="module")
def inputs_placement(fp_model, calib_images):
    """The w4a8 model with only the matmul and norm inputs quantized (float LayerNorms)."""
    from evolq.quant.config import QuantConfig

    config = QuantConfig.preset("w4a8", placement="inputs")
    return QuantizedModel(fp_model, config).calibrate(calib_images, batch_size=CALIB_BATCH, progress=False)


@pytest.mark.parametrize("placement", ["full", "inputs"])
def test_fused_mlp_and_layer_norms_run_only_where_they_apply(placement, qmodel, inputs_placement, images, monkeypatch):
    if not kernels.accepts(images):
        pytest.skip("the compiled kernels are off (EVOLQ_KERNELS=off) or unavailable")
    if placement == "inputs":
        qmodel = inputs_placement
    calls = {"gelu": 0, "norm": 0}
    # "full": FQ-ViT's integer LayerNorm, its kernel bit for bit its torch ops, so it also runs dequantized
    norm_kernel = "integer_layer_norm" if placement == "full" else "ptf_layer_norm"
    dequantized_norms = 2 if placement == "full" else 0
    for key, name in (("gelu", "bias_gelu_levels_"), ("norm", norm_kernel)):
        def counting(*args, _original=getattr(kernels, name), _key=key):
            calls[_key] += 1
            return _original(*args)
        monkeypatch.setattr(kernels, name, counting)
    block = qmodel.model.blocks[0]
    assert isinstance(block.mlp, QMlp) and isinstance(block.norm1, QLayerNorm)
    h = qmodel.prefix(images[:20], 0).detach()
    with torch.inference_mode():
        fused = block(h)
        assert calls == {"gelu": 1, "norm": 2}
        with kernels.disabled():
            plain = block(h)
        with qmodel.dequantized():
            block(h)
    assert calls == {"gelu": 1, "norm": 2 + dequantized_norms}  # torch's ops in both
    # the same block up to values moved to a neighbouring level by another float rounding
    assert (fused - plain).abs().mean() < 1e-3 * plain.abs().mean()
    tracked = h.clone().requires_grad_(True)
    block(tracked).sum().backward()
    assert calls == {"gelu": 1, "norm": 2 + dequantized_norms} and tracked.grad.abs().sum() > 0  # autograd: torch's


def test_nothing_runs_on_levels_under_autograd(qmodel, images, counted):
    x = images[:10].clone().requires_grad_(True)
    logits = qmodel(x)
    assert counted == {"linear": 0, "bmm": 0} and logits.requires_grad
    with torch.no_grad():
        qmodel(images[:10])
    assert counted["linear"] > 0


def test_the_inputs_of_a_forward_are_left_as_they_were(qmodel, images):
    f = BlockObjective(qmodel, 2, images, batch_size=50)
    cached = [h.clone() for h in f._inputs]
    given = images.clone()
    f(near(f.x0, 1))
    with torch.inference_mode():
        qmodel(given)
    assert all(torch.equal(a, b) for a, b in zip(cached, f._inputs))  # in-place rounding only on temporaries
    assert torch.equal(given, images)


def test_a_layer_overwrites_its_input_only_when_it_owns_it(qmodel, images):
    fc2 = qmodel.model.blocks[0].mlp.fc2
    qkv = qmodel.model.blocks[0].attn.qkv
    assert fc2.owns_input and qkv.owns_input and not qmodel.model.head.owns_input
    x = torch.randn(4, 5, fc2.weight.shape[1])
    with torch.inference_mode():
        fc2.owns_input = False
        kept = x.clone()
        out = fc2(x)
        assert torch.equal(x, kept)
        fc2.owns_input = True
        assert torch.equal(fc2(x), out) and not torch.equal(x, kept)  # rounded in place, same result


@pytest.mark.parametrize("elements", [1, 200_000, 10**9])
def test_chunked_blocks_give_the_numbers_of_whole_batches(qmodel, images, elements):
    with torch.inference_mode():
        whole = qmodel.suffix(qmodel.prefix(images, 2), 2)
        qmodel.CHUNK_ELEMENTS = elements
        h = qmodel.prefix(images, 2)
        chunks = qmodel._chunks(h)
        chunked = qmodel.suffix(h, 2)
        inputs = qmodel.block_inputs(images)
        forward = qmodel(images)
    sizes = {len(c) for c in chunks[:-1]}
    expected = {1: 100, 200_000: 7, 10**9: 1}[elements]  # 50 tokens x 256 hidden = 12,800 per image
    assert len(chunks) == expected and len(sizes) <= 1 and sum(map(len, chunks)) == len(images)
    # GEMM kernels may round differently for another row count (one image: 50 rows; how differently
    # depends on the machine), so logits move by whole steps and the loss as much as they allow ...
    assert_only_neighbouring_levels(chunked, whole, qmodel.model.head.output_quant.step())
    targets = torch.randn_like(whole)
    loss = infonce(whole, targets).item()
    assert abs(infonce(chunked, targets).item() - loss) <= infonce_shift_bound(chunked, whole, loss, batch=100)
    # ... but prefix, block inputs, suffix and forward cut the same chunks, so they agree bit for bit
    assert torch.equal(inputs[2], h) and torch.equal(forward, chunked)


def test_chunks_are_equal_and_only_for_token_sequences(qmodel):
    chunks = qmodel._chunks(torch.zeros(400, 50, 64))  # 400 x 50 x 256 = 5.12M elements in chunks of <= 2M
    assert [len(c) for c in chunks] == [134, 134, 132]
    assert len(qmodel._chunks(torch.zeros(400, 64))) == 1


def test_grid_is_kept_until_the_parameters_change():
    quantizer = UniformQuantizer(BitType(8), MinMaxObserver(BitType(8)))
    quantizer.observer.update(torch.tensor([-1.0, 3.0]))
    quantizer.finish_calibration()
    quantizer.mode = "quant"
    grid = quantizer.grid(torch.float32)
    assert quantizer.grid(torch.float32) is grid and quantizer.grid(torch.bfloat16) is not grid
    assert (grid.inverse, grid.low, grid.high) == (pytest.approx(255 / 4), -64.0, 191.0)
    quantizer.grid(torch.float32)
    quantizer.scale.mul_(2)  # changed in place
    doubled = quantizer.grid(torch.float32)
    assert doubled.scale == pytest.approx(2 * grid.scale)
    quantizer.scale = torch.tensor(0.5)  # replaced
    assert quantizer.grid(torch.float32).scale == 0.5
    x = torch.linspace(-2, 2, 9)
    assert quantizer(x).tolist() == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert quantizer.levels(x).tolist() == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_ptf_grid_uses_scalar_bounds_for_its_shared_zero_point(calibrated_w4a8):
    ptf = calibrated_w4a8.model.blocks[0].norm1.input_quant
    grid = ptf.grid(torch.float32)
    assert ptf.channel_axis == -1 and isinstance(grid.low, float) and grid.inverse.shape == ptf.scale.shape
    x = torch.randn(3, 7, ptf.scale.numel()) * 4
    with torch.no_grad():
        ours = ptf(x)
    reference = torch.fake_quantize_per_channel_affine(x, ptf.scale, ptf.zero_point, 2, 0, 255)
    assert torch.equal(ours, reference)
