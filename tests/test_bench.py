"""The benchmark's accounting (FLOPs, bytes per decode step) and, marked slow, a whole tiny run."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench  # noqa: E402
from grok1.config import ModelConfig  # noqa: E402

SMALL = ModelConfig(vocab_size=256, emb_size=64, num_q_heads=4, num_kv_heads=2, key_size=16,
                    num_layers=2, widening_factor=2, sequence_len=128)


def test_batch_one_reads_exactly_its_k_experts():
    assert bench.expected_experts_used(SMALL, 1) == SMALL.num_selected_experts


def test_decode_bytes_count_dense_weights_chosen_experts_and_cache():
    dense = {"language_model/in_out_embed": {"embeddings": np.zeros((256, 64), np.float32)}}
    moe = {"transformer/decoder_layer_0/moe/linear": {"w": np.zeros((8, 64, 88), np.float32)}}
    got = bench.decode_bytes(SMALL, {**dense, **moe}, batch=1, cache_len=10, cache_itemsize=4)
    kv = 2 * SMALL.num_layers * 1 * 10 * SMALL.num_kv_heads * SMALL.key_size * 4
    assert got == 256 * 64 * 4 + 8 * 64 * 88 * 4 * 2 / 8 + kv


def test_prefill_flops_are_two_per_multiply_add_of_the_chosen_path():
    c, T = SMALL, 10
    d, f = c.emb_size, c.ffn_size
    per_layer = (2 * (2 * d * d + 2 * d * c.num_kv_heads * c.key_size) + 2 * d * c.num_experts
                 + 2 * 2 * 3 * d * f + 4 * T * d)
    assert bench.prefill_flops(c, T) == T * c.num_layers * per_layer + 2 * c.vocab_size * d


@pytest.mark.slow
def test_tiny_benchmark_runs_end_to_end(tmp_path):
    res = bench.main(["--tiny", "--repeat", "1", "--batch", "1", "2", "--sampled", "2", "--prefill", "16",
                      "--first-token", "8", "--context", "16", "--json", str(tmp_path / "r.json")])
    assert res["decode"][1]["tokens_per_s"] > 0 and 0 < res["prefill"][16]["mfu"]
    assert res["decode_sampled"][2]["tokens_per_s"] > 0
    assert (tmp_path / "r.json").is_file()


def test_random_int8_draws_small_tensors_value_by_value_as_before():
    # bench-1b's tensors are all below the pool threshold: its cached checkpoint stays the same.
    want = np.random.default_rng(3).integers(-127, 128, (4, 5464, 1024), dtype=np.int8)
    np.testing.assert_array_equal(bench.random_int8(np.random.default_rng(3), (4, 5464, 1024)), want)


def test_random_int8_fills_large_tensors_from_a_pool_within_the_int8_range(monkeypatch):
    monkeypatch.setattr(bench, "POOL_ABOVE", 1000)
    monkeypatch.setattr(bench, "POOL_SIZE", 257)
    values = bench.random_int8(np.random.default_rng(0), (3, 700))
    assert values.shape == (3, 700) and values.dtype == np.int8
    assert values.min() >= -127 and values.max() <= 127
    assert len(np.unique(values)) > 100


def test_the_capped_set_multiplies_query_and_key_scales_by_8_and_leaves_the_rest(tmp_path):
    import capped_set
    from conftest import GOLDEN, require
    from grok1.checkpoint import read_config, read_tensor, tensor_specs

    source = require(GOLDEN / "two_layer")
    capped_set.make(tmp_path / "capped")
    for spec in tensor_specs(read_config(source)):
        old, new = (read_tensor(folder / "ckpt-0" / spec.filename) for folder in (source, tmp_path / "capped"))
        if spec.module.endswith(("/query", "/key")):
            assert np.array_equal(new.weight, old.weight)
            assert np.array_equal(np.asarray(new.scales, np.float32), 8 * np.asarray(old.scales, np.float32))
        else:
            assert np.array_equal(np.asarray(getattr(new, "scales", new), np.float32),
                                  np.asarray(getattr(old, "scales", old), np.float32))
    assert (tmp_path / "capped" / "golden.json").read_bytes() == (source / "golden.json").read_bytes()
