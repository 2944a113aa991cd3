"""Contexts are priced before they are allocated (issue 12.7): a header claiming 2^30 positions is
refused in one line saying how much it needs and what fits."""

import pytest

from llmtp.common.errors import ConfigError
from llmtp.common.model.memory import check_context, context_bytes, kv_cache_bytes, largest_context, with_context
from model_factory import make_config


def test_kv_cache_bytes_counts_every_layer_slot_head_and_position():
    config = make_config(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, seq_len=32)  # head_dim 8
    # keys and values, float32
    assert kv_cache_bytes(config, n_slots=3) == 2 * 2 * 3 * 2 * 32 * 8 * 4
    assert kv_cache_bytes(config, n_slots=3, n_kv_heads_local=1) == kv_cache_bytes(config, 3) // 2


def test_a_huge_context_is_one_line_with_what_fits():
    config = make_config(seq_len=2 ** 30)
    with pytest.raises(ConfigError) as error:
        check_context(config, 1, "model.bin", budget_bytes=8 * 2 ** 30)
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.bin:") and "GiB" in message
    fits = largest_context(config, 1, 8 * 2 ** 30)
    assert f"--context {fits} fits" in message
    assert context_bytes(with_context(config, fits, "m"), 1) <= 8 * 2 ** 30
    assert context_bytes(with_context(config, fits + 1, "m"), 1) > 8 * 2 ** 30


def test_a_context_that_fits_passes():
    check_context(make_config(seq_len=32), 4, "m", budget_bytes=10 ** 6)


def test_with_context_refuses_more_than_the_model_has():
    config = make_config(seq_len=32)
    assert with_context(config, 16, "m").seq_len == 16
    assert with_context(config, None, "m") is config
    for bad in (0, 33):
        with pytest.raises(ConfigError, match="outside 1..32"):
            with_context(config, bad, "m")
