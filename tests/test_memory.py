"""Contexts are priced before they are allocated (issue 12.7): a header claiming 2^30 positions is
refused in one line saying how much it needs and what fits."""

import numpy as np
import pytest

from llmtp.common.errors import ConfigError
from llmtp.common.model.transformer import KVCache
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


def vm_flags_of(address: int) -> list[str] | None:
    """The VmFlags of the mapping holding `address` (from /proc/self/smaps), None off Linux."""
    try:
        smaps = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in smaps:
        head = line.split()[0]
        if "-" in head and all(part and all(c in "0123456789abcdef" for c in part) for part in head.split("-")):
            start, stop = (int(part, 16) for part in head.split("-"))
            inside = start <= address < stop
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_the_kv_cache_is_zeros_on_ordinary_pages():
    # np.zeros would madvise 2 MiB pages (flag "hg") on an allocation this large; their first
    # writes may compact memory (~100 ms of a first step), so the cache must not ask for them
    cache = KVCache(n_layers=2, n_slots=2, n_kv_heads_local=4, seq_len=1024, head_dim=64)  # 8 MiB each
    for array in (cache.keys, cache.values):
        assert array.shape == (2, 2, 4, 1024, 64) and array.dtype == np.float32 and not array.any()
        array[1, 1, 3, 1023] = 1.5  # writable
        assert array[1, 1, 3, 1023, 63] == 1.5
        flags = vm_flags_of(array.ctypes.data + array.nbytes // 2)  # numpy advises whole 2 MiB pages only
        if flags is None:
            pytest.skip("no /proc/self/smaps here")
        assert "hg" not in flags, flags
    assert cache.n_bytes == kv_cache_bytes(make_config(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, seq_len=1024),
                                          n_slots=2)


def test_an_empty_cache_is_allowed():
    assert KVCache(n_layers=1, n_slots=0, n_kv_heads_local=2, seq_len=8, head_dim=4).n_bytes == 0
