"""Weight files mapped onto 2 MiB pages (common/mapping.py): same bytes, fewer TLB misses."""

import numpy as np
import pytest

from llmtp.common.formats import mapping

FILE_BYTES = 16 * 2**20


@pytest.fixture
def weight_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    with open(path, "wb") as file:  # written 4 KiB at a time, so the page cache holds it in small folios
        for start in range(0, FILE_BYTES, 4096):
            file.write(data[start:start + 4096].tobytes())
    return path, data


def test_settling_keeps_the_bytes_and_lands_on_huge_pages(weight_file, monkeypatch):
    path, data = weight_file
    monkeypatch.setattr(mapping, "SMALLEST_WORTH_SAYING", 0)  # our file is small; say what happened
    if not mapping.huge_pages_possible():
        pytest.skip("transparent huge pages are off on this kernel")
    first = mapping.map_readonly(path)
    note = mapping.settle_on_huge_pages(first, path)
    share = mapping.huge_page_share(first)
    if share is None or share < mapping.HUGE_PAGE_SHARE_WANTED:  # the file is a whole number of 2 MiB pages
        pytest.skip(f"this filesystem or kernel gives file maps no 2 MiB pages (share {share})")
    assert note is not None and "reloaded onto 2 MiB pages" in note and str(path) in note
    assert np.array_equal(np.frombuffer(first, dtype=np.uint8), data)

    # The page cache keeps the large folios: the next map finds them and reloads nothing.
    second = mapping.map_readonly(path)
    assert mapping.settle_on_huge_pages(second, path) is None
    assert mapping.huge_page_share(second) >= mapping.HUGE_PAGE_SHARE_WANTED
    assert np.array_equal(np.frombuffer(second, dtype=np.uint8), data)


def test_without_huge_pages_the_map_is_only_faulted_in(weight_file, monkeypatch):
    path, data = weight_file
    monkeypatch.setattr(mapping, "huge_pages_possible", lambda: False)
    buffer = mapping.map_readonly(path)
    assert mapping.settle_on_huge_pages(buffer, path) is None
    assert np.array_equal(np.frombuffer(buffer, dtype=np.uint8), data)


def test_a_filesystem_that_refuses_to_drop_pages_still_gives_the_same_bytes(weight_file, monkeypatch):
    path, data = weight_file

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mapping, "huge_pages_possible", lambda: True)
    monkeypatch.setattr(mapping, "huge_page_share", lambda buffer: 0.0)  # never looks settled
    monkeypatch.setattr(mapping.os, "posix_fadvise", refuse)
    buffer = mapping.map_readonly(path)
    assert mapping.settle_on_huge_pages(buffer, path) is None
    assert np.array_equal(np.frombuffer(buffer, dtype=np.uint8), data)
