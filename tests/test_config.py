"""ModelConfig: official field names, derived sizes, validation with clear errors."""

from __future__ import annotations

import json
import pathlib

import pytest

from grok1.config import PRESETS, ConfigError, ModelConfig


def test_grok1_preset_has_the_released_parameter_count():
    assert PRESETS["grok-1"].param_count == 315_684_820_992


def test_grok1_ffn_size_is_32768():
    assert PRESETS["grok-1"].ffn_size == 32768


def test_ffn_size_rounds_up_to_a_multiple_of_8():
    # int(2 * 256) * 2 // 3 = 341 -> 344, as in the two_layer golden checkpoint.
    assert ModelConfig(emb_size=256, num_q_heads=16, key_size=16, widening_factor=2).ffn_size == 344


def test_bench_1b_preset_matches_the_benchmark_spec():
    c = PRESETS["bench-1b"]
    assert (c.vocab_size, c.emb_size, c.num_q_heads, c.num_kv_heads, c.key_size, c.num_layers) == \
        (131072, 1024, 16, 4, 64, 4)
    assert c.ffn_size == 5464 and c.sequence_len == 512


def test_json_round_trip_keeps_every_field(tmp_path):
    config = PRESETS["bench-1b"]
    path = tmp_path / "config.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config
    assert set(json.loads(path.read_text())) == set(config.to_dict())


def test_reads_the_golden_config_with_official_field_names(golden):
    config = ModelConfig.from_json(golden.path / "config.json")
    assert config.num_experts == 8 and config.num_selected_experts == 2


def test_refuses_emb_size_not_equal_to_heads_times_key_size():
    with pytest.raises(ConfigError, match=r"emb_size \(100\) must equal num_q_heads \* key_size"):
        ModelConfig(emb_size=100, num_q_heads=48, key_size=128)


def test_refuses_q_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match=r"num_q_heads \(48\) must be a multiple of num_kv_heads \(5\)"):
        ModelConfig(num_kv_heads=5)


def test_refuses_more_selected_experts_than_experts():
    with pytest.raises(ConfigError, match="num_selected_experts"):
        ModelConfig(num_selected_experts=9)


def test_refuses_non_positive_sizes():
    with pytest.raises(ConfigError, match="num_layers must be a positive integer"):
        ModelConfig(num_layers=0)


def test_refuses_unknown_fields_naming_them():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['num_heads'\]"):
        ModelConfig.from_dict({"num_heads": 4})


def test_refuses_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "nope.json")


def test_bos_is_added_for_the_small_model_and_not_for_the_grok1_release():
    small = ModelConfig.from_json(pathlib.Path(__file__).resolve().parent.parent / "checkpoints/small/config.json")
    assert small.add_bos and small.bos_token == 1
    assert not PRESETS["grok-1"].add_bos


def test_refuses_add_bos_that_is_not_a_boolean():
    with pytest.raises(ConfigError, match="add_bos"):
        ModelConfig(add_bos="yes")


def test_refuses_bos_token_outside_the_vocabulary():
    with pytest.raises(ConfigError, match="bos_token"):
        ModelConfig(bos_token=131072)
