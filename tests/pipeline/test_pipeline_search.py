"""The block-wise search on the shipped default model: it improves, resumes exactly, and reloads."""

import json

import numpy as np
import pytest
import torch

import evolq
from evolq.checkpoint import SearchCheckpoint
from evolq.objective import fp_logits, model_loss
from evolq.pipeline import prepare


def test_search_lowers_the_calibration_loss(qmodel_w4a8, data):
    calib, selection = data
    before = model_loss(qmodel_w4a8, calib, fp_logits(qmodel_w4a8, calib))
    found = evolq.search(qmodel_w4a8, calib, selection, passes=1, evaluations_per_block=8, seed=0, progress=False)
    history = found.history
    assert found.evaluations == len(history) == 6 * 8
    assert list(history["block"].unique()) == [5, 4, 3, 2, 1, 0]  # last block first
    # The first evaluation of the first visit is the PTQ model itself.
    assert history["value"].iloc[0] == pytest.approx(before, rel=1e-6)
    assert history["value"].min() < before
    assert found.calib_loss <= before


def test_every_visit_costs_one_plus_three_evaluations_by_default(qmodel_w4a8, data):
    calib, selection = data
    found = evolq.search(qmodel_w4a8, calib, selection, passes=1, seed=0, progress=False)
    assert found.evaluations == 6 * 4
    assert (found.history.groupby("block").size() == 4).all()


@pytest.mark.parametrize("space", ["paper", "all"])
def test_resume_after_interruption_equals_uninterrupted_run(fmnist_train, data, tmp_path, monkeypatch, space,
                                                           interrupt_after):
    calib, selection = data
    images, _ = fmnist_train

    def fresh():
        return evolq.QuantizedModel(evolq.load_default(), "w4a8").calibrate(images[:200], progress=False)

    settings = dict(passes=2, seed=3, space=space, progress=False)
    straight = fresh()
    expected = evolq.search(straight, calib, selection, **settings)

    interrupt_after(7)  # stop inside the second pass
    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        evolq.search(interrupted, calib, selection, checkpoint_dir=tmp_path, **settings)
    monkeypatch.undo()

    resumed_model = fresh()
    resumed = evolq.search(resumed_model, calib, selection, checkpoint_dir=tmp_path, resume=True, **settings)
    assert straight.quant_state().keys() == resumed_model.quant_state().keys()
    for name, tensor in straight.quant_state().items():  # every quantizer, activations included
        assert torch.equal(tensor, resumed_model.quant_state()[name]), name
    assert resumed.calib_loss == expected.calib_loss
    assert resumed.best_pass == expected.best_pass
    assert resumed.history["value"].tolist() == expected.history["value"].tolist()


def test_resume_refuses_a_folder_of_another_configuration(qmodel_w4a8, data, tmp_path):
    calib, selection = data
    evolq.search(qmodel_w4a8, calib, selection, passes=1, seed=0, checkpoint_dir=tmp_path,
                 fingerprint={"preset": "w4a8"}, progress=False)
    with pytest.raises(evolq.UsageError, match="preset='w4a8'.*preset='w3a8'"):
        evolq.search(qmodel_w4a8, calib, selection, passes=1, seed=0, checkpoint_dir=tmp_path,
                     fingerprint={"preset": "w3a8"}, resume=True, progress=False)


def test_quantize_writes_a_run_that_load_quantized_rebuilds(tmp_path):
    config = evolq.RunConfig(calib_size=100, selection_size=100, eval_size=300, passes=1, threads=1)
    result = evolq.run_quantize(config, out=tmp_path, progress=False)
    written = json.loads((tmp_path / "result.json").read_text())
    for key in ("fp_top1", "ptq_top1", "final_top1", "calib_loss_ptq", "calib_loss_final", "selection_loss",
                "evaluations", "wall_s", "config", "versions"):
        assert key in written
    assert written["complete"] is True and written["evaluations"] == 24
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0] == "pass,block,optimizer,evaluation,value,best,seconds" and len(history) == 1 + 24

    rebuilt = evolq.load_quantized(tmp_path)
    images, labels = evolq.load_fmnist("test")
    with torch.inference_mode():
        correct = (rebuilt(images[:300]).argmax(-1) == labels[:300]).sum().item()
    assert 100.0 * correct / 300 == pytest.approx(result["final_top1"], abs=1e-9)


def test_load_quantized_rebuilds_a_random_weight_timm_run_with_its_weights(tmp_path):
    config = evolq.RunConfig(model="vit_tiny_patch16_224", optimizer="none", calib_size=20, selection_size=1,
                             eval_size=10, seed=4, threads=1)
    evolq.run_quantize(config, out=tmp_path, progress=False)
    torch.manual_seed(123)  # whatever the generator holds now: the weights come from the run's seed
    rebuilt = evolq.load_quantized(tmp_path)
    prepared = prepare(config, progress=False)  # the run's model, calibrated as the run did
    images = prepared.calib_images[:4]
    with torch.inference_mode():
        assert torch.equal(rebuilt(images), prepared.qmodel(images))


@pytest.mark.parametrize("optimizer", ["cmaes", "random", "ng:OnePlusOne", "gradient"])
def test_every_optimizer_runs_the_block_wise_search(qmodel_w4a8, data, optimizer):
    calib, selection = data
    found = evolq.search(qmodel_w4a8, calib, selection, optimizer=optimizer, passes=1, evaluations_per_block=3,
                         seed=0, progress=False)
    assert found.evaluations == 6 * 3
    assert np.isfinite(found.history["value"]).all()


def test_a_run_recorded_before_placements_existed_loads_as_inputs(tmp_path):
    config = evolq.RunConfig(calib_size=50, selection_size=10, eval_size=20, optimizer="none", placement="inputs",
                             threads=1)
    evolq.run_quantize(config, out=tmp_path, progress=False)
    recorded = json.loads((tmp_path / "result.json").read_text())
    del recorded["config"]["placement"], recorded["quant_config"]["placement"]  # as earlier versions wrote it
    (tmp_path / "result.json").write_text(json.dumps(recorded))
    assert evolq.RunConfig.from_result(tmp_path / "result.json").placement == "inputs"
    assert evolq.load_quantized(tmp_path).config.placement == "inputs"


@pytest.mark.parametrize("select_by, space, rule", [
    ("top1", "weights", "top1"), ("loss", "weights", "loss"),
    (None, "weights", "loss"), (None, "paper", "top1"),  # the defaults: the paper's rule in its own space only
])
def test_the_returned_pass_is_the_best_by_the_chosen_measure(qmodel_w4a8, data, select_by, space, rule):
    calib, selection = data
    found = evolq.search(qmodel_w4a8, calib, selection, passes=3, seed=1, select_by=select_by, space=space,
                         progress=False)
    passes = found.passes
    assert [p["pass_index"] for p in passes] == [0, 1, 2, 3]
    if rule == "loss":
        chosen = min(passes, key=lambda p: p["selection_loss"])
    else:  # the highest top-1, the lower loss among equals
        chosen = max(passes, key=lambda p: (p["selection_top1"], -p["selection_loss"]))
    assert found.best_pass == chosen["pass_index"]
    assert (found.selection_top1, found.selection_loss) == (chosen["selection_top1"], chosen["selection_loss"])


def test_spaces_other_than_the_papers_search_in_ratios_by_default(qmodel_w4a8, data, monkeypatch):
    """The optimizer sees ones at every visit's start (ratios), with the ratio mutation size."""
    import optimizers
    from evolq.search import RATIO_EPS

    calib, selection = data
    starts, sizes = [], []
    original = optimizers.EvolutionarySearch.minimize

    def spy(self, f, x0, *args, **kwargs):
        starts.append(np.asarray(x0).copy())
        sizes.append(self.eps)
        return original(self, f, x0, *args, **kwargs)

    monkeypatch.setattr(optimizers.EvolutionarySearch, "minimize", spy)
    evolq.search(qmodel_w4a8, calib, selection, passes=1, seed=0, space="all", progress=False)
    assert len(starts) == 6 and all(np.array_equal(x, np.ones_like(x)) for x in starts)
    assert sizes == [RATIO_EPS] * 6
    starts.clear()
    last_block = qmodel_w4a8.block(5).scales()  # the paper's space: the scales as they are, eps 1e-3 at 4 bits
    evolq.search(qmodel_w4a8, calib, selection, passes=1, seed=0, space="paper", progress=False)
    assert np.array_equal(starts[0], last_block) and sizes[-1] == 1e-3
