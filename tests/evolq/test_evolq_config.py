"""QuantConfig: presets by name, defaults of the released Evol-Q code, and bad settings."""

import pytest

from evolq.errors import UsageError
from evolq.qmodel import QuantizedModel
from evolq.quant.config import PRESETS, QuantConfig


@pytest.mark.parametrize("name, wbits, abits", [("w8a8", 8, 8), ("w4a8", 4, 8), ("w3a4", 3, 4), ("w2a2", 2, 2)])
def test_presets_parse(name, wbits, abits):
    config = QuantConfig.preset(name)
    assert (config.wbits, config.abits, config.name) == (wbits, abits, name)


def test_every_listed_preset_parses():
    assert PRESETS == ("w8a8", "w6a6", "w4a8", "w3a8", "w4a4", "w3a4")
    assert [QuantConfig.preset(name).name for name in PRESETS] == list(PRESETS)


def test_defaults_match_the_released_code():
    config = QuantConfig()
    assert (config.wbits, config.abits) == (8, 8)
    assert config.act_observer == "omse" and config.ptf and config.bias_correction
    assert (config.softmax, config.softmax_bits) == ("uniform", 8)


def test_preset_overrides_and_dict_round_trip():
    config = QuantConfig.preset("w4a8", act_observer="minmax", softmax="log2", softmax_bits=4)
    assert (config.wbits, config.act_observer, config.softmax, config.softmax_bits) == (4, "minmax", "log2", 4)
    assert QuantConfig(**config.to_dict()) == config
    assert config.with_(wbits=3).name == "w3a8"


@pytest.mark.parametrize(
    "name, phrases",
    [
        ("w9a8", ["wbits 9", "2..8"]),
        ("w1a8", ["wbits 1", "2..8"]),
        ("w8a9", ["abits 9", "2..8"]),
        ("w4a0", ["abits 0", "2..8"]),
        ("foo", ["preset 'foo' is unknown", "w8a8, w6a6, w4a8, w3a8, w4a4, w3a4", "2..8"]),
        ("W8A8", ["preset 'W8A8'"]),
        ("w8", ["preset 'w8'"]),
        ("", ["preset ''"]),
    ],
)
def test_bad_presets_name_the_value_and_what_is_allowed(name, phrases):
    with pytest.raises(UsageError) as error:
        QuantConfig.preset(name)
    for phrase in phrases:
        assert phrase in str(error.value)


@pytest.mark.parametrize(
    "field, value", [("wbits", 1), ("wbits", 9), ("abits", 1), ("abits", 9), ("softmax_bits", 1), ("wbits", 4.0)]
)
def test_bits_outside_2_to_8_are_usage_errors(field, value):
    with pytest.raises(UsageError, match=rf"^{field} {value!r} is not allowed; allowed: integers 2\.\.8$"):
        QuantConfig(**{field: value})


def test_unknown_observer_or_softmax_lists_the_allowed():
    with pytest.raises(UsageError, match=r"observer 'ptf' is unknown; allowed: minmax, ema, percentile, omse$"):
        QuantConfig(act_observer="ptf")
    with pytest.raises(UsageError, match=r"softmax quantizer 'exp' is unknown; allowed: uniform, log2$"):
        QuantConfig(softmax="exp")


def test_quantized_model_checks_the_preset_before_copying_the_model():
    with pytest.raises(UsageError, match="wbits 9"):
        QuantizedModel(object(), "w9a8")
