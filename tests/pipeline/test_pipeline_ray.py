"""One search on Ray actors holding model replicas: the numbers of the local search, bit for bit."""

import pytest
import torch

import evolq
from evolq.pipeline import RunConfig
from evolq.search import parallel_options
from evolq.visits import open_visits


@pytest.fixture()
def one_thread():
    """The local search on one thread, as each actor runs, whatever EVOLQ_TEST_THREADS says."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_search_interrupted_and_resumed_equals_the_local_search(local_ray, one_thread, fmnist_train, data,
                                                                    tmp_path, monkeypatch, interrupt_after):
    calib, selection = data
    images, _ = fmnist_train

    def fresh():
        return evolq.QuantizedModel(evolq.load_default(), "w4a8").calibrate(images[:200], progress=False)

    # "all": activation scales too, so the replicas must agree on every quantizer, not only weights
    settings = dict(passes=2, seed=5, space="all", candidates_per_step=2, progress=False)
    local = fresh()
    expected = evolq.search(local, calib, selection, **settings)

    interrupt_after(8)  # inside the second pass
    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        evolq.search(interrupted, calib, selection, checkpoint_dir=tmp_path, executor="ray", actors=2, **settings)
    monkeypatch.undo()
    on_ray = fresh()
    resumed = evolq.search(on_ray, calib, selection, checkpoint_dir=tmp_path, resume=True, executor="ray", actors=2,
                           **settings)

    assert local_ray.is_initialized()  # a Ray started by the caller is left running
    assert resumed.history["value"].tolist() == expected.history["value"].tolist()
    assert (resumed.best_pass, resumed.calib_loss) == (expected.best_pass, expected.calib_loss)
    for name, tensor in local.quant_state().items():
        assert torch.equal(tensor, on_ray.quant_state()[name]), name


def test_children_per_step_proposes_candidates_together_within_the_visit_budget(qmodel_w4a8, data):
    calib, selection = data
    found = evolq.search(qmodel_w4a8, calib, selection, passes=1, candidates_per_step=2, seed=0, progress=False)
    assert (found.history.groupby("block").size() == 4).all()  # x0, two children together, one more


@pytest.mark.parametrize("optimizer, options, expected", [
    ("evolq", {}, {"children_per_step": 3}),
    ("ng:OnePlusOne", {}, {"num_workers": 3}),
    ("evolq", {"children_per_step": 5}, {"children_per_step": 5}),  # an explicit option wins
    ("cmaes", {}, {}),  # asks its population anyway
    ("gradient", {}, {}),
])
def test_parallel_options_name_each_optimizers_own_setting(optimizer, options, expected):
    assert parallel_options(optimizer, options, 3) == expected
    assert parallel_options(optimizer, options, 1) == options


def test_candidates_default_to_one_per_actor_and_decide_the_fingerprint():
    on_ray = RunConfig(executor="ray", actors=4)
    assert on_ray.candidates() == 4
    assert on_ray.fingerprint()["candidates_per_step"] == 4
    # where the candidates are scored does not change the numbers, so --resume may move a run
    assert on_ray.fingerprint() == RunConfig(candidates_per_step=4).fingerprint()
    assert RunConfig(executor="ray", actors=4, candidates_per_step=1).candidates() == 1


@pytest.mark.parametrize("actors, gpus, needles", [
    (3, 0, ["3 actors need 3 CPUs", "has 2"]),
    (1, 1, ["1 actors need 1 GPUs", "has 0"]),
])
def test_actors_the_cluster_cannot_hold_are_one_line_not_a_wait(local_ray, qmodel_w4a8, data, actors, gpus, needles):
    calib, _ = data
    with pytest.raises(evolq.UsageError) as error:
        open_visits(qmodel_w4a8, calib, calib[:0], "infonce", "paper", "reverse", "ray", actors, None, gpus)
    assert all(needle in str(error.value) for needle in needles)
    assert local_ray.is_initialized()  # a Ray the caller started stays up
