"""The embedded models of evolq.zoo: every shipped file is what its model card says, loads offline and is trained."""

import json

import pytest
from torch.utils.data import Subset

from evolq.data import fmnist_for
from evolq.errors import UsageError
from evolq.evaluate import top1
from evolq.families import family_of
from evolq.files import sha256
from evolq.zoo import ZOO, ZooModel, model_card

SHIPPED = [entry for entry in ZOO.values() if entry.checkpoint.is_file()]
SUBSET = 2000  # test images scored here; the card's top-1 is over all 10,000


def test_every_new_family_has_a_shipped_model():
    assert {family_of(entry.architecture()).name for entry in SHIPPED} >= {"vit", "resnet", "swin", "levit"}


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda entry: entry.name)
def test_model_card_describes_the_shipped_checkpoint(entry):
    card = model_card(entry.name)
    model = entry.architecture()
    assert card["sha256"] == sha256(entry.checkpoint)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["architecture"] == json.loads(json.dumps(entry.architecture_record()))  # tuples are lists in JSON


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda entry: entry.name)
def test_shipped_model_is_trained_to_its_cards_top1(entry):
    model = entry.load()
    assert not model.training
    test = Subset(fmnist_for(model, "test"), range(SUBSET))
    accuracy = top1(model, test, progress=False)
    # The first 2,000 test images against all 10,000: the subset's top-1 has a sampling spread of
    # sqrt(p(1-p)/2000) < 0.8 points, so 3 points is about four of those.
    assert accuracy == pytest.approx(model_card(entry.name)["test_top1"], abs=3.0)
    assert accuracy > 80.0  # chance is 10 %


def test_an_embedded_model_not_shipped_yet_says_how_to_train_it():
    entry = ZooModel("default-new", "no_such_file", ZOO["default"].family, ZOO["default"].arch)
    with pytest.raises(UsageError, match="'default-new' is not shipped yet; allowed: train it with "
                                         "'evolq train-default --model default-new'"):
        entry.load()

