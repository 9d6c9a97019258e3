"""calibrate_split times the two branches and sets the split ratio."""

import pytest

from flowhn_hf import calibrate_split, preset_config


def test_calibrate_split_sets_a_ratio_on_the_cpu():
    config = preset_config("tiny", split_mode="flop_aware")
    ratio = calibrate_split(config, seq_len=64, device="cpu", steps=3)
    assert 0 < ratio < 1 and config.attention_ratio == ratio
    assert config.resolved_attention_ratio == ratio


def test_calibrate_split_rejects_a_bad_length():
    with pytest.raises(ValueError, match="seq_len"):
        calibrate_split(preset_config("tiny"), seq_len=2, device="cpu")
