"""Read-only maps of weight files, on 2 MiB pages where the kernel allows it.

A decode step streams every weight once. Through 4 KiB pages the TLB misses cost about
13% of that stream (110M shard, one core: 13.5 GB/s on 4 KiB pages, 16.0 GB/s on 2 MiB
pages, in one run). With transparent huge pages in `madvise` mode, a file map gets 2 MiB
pages only when it asked for them (MADV_HUGEPAGE) *and* the page cache holds the file in
2 MiB folios, which it does when the pages were first faulted in through such a map. A
file first read with read() sits in small folios, and stays so until it leaves the cache;
`settle_on_huge_pages` notices that and reloads the file once. The page cache keeps the
large folios after the process exits, so later starts find them at once.
"""

import mmap
import os
from pathlib import Path

import numpy as np

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
HUGE_PAGE = 2 * 2**20
# Of what can be (a file's tail shorter than 2 MiB is always on small pages). Small pages
# stream ~13% slower, so a file 3% on them decodes ~0.4% slower, while the reload re-reads the
# whole file (0.3 s for 440 MB, more than its first token takes): reload only when a tenth or
# more has fallen to small pages, as the kernel splits cached huge pages over time.
HUGE_PAGE_SHARE_WANTED = 0.9
SMALLEST_WORTH_SETTLING = 4 * HUGE_PAGE
# A step streams every page once, so the TLB misses cost the same share of any large file's
# stream; a reload is worth a line only where re-reading the file takes a noticeable moment.
SMALLEST_WORTH_SAYING = 256 * 2**20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def map_readonly(path: str | os.PathLike) -> mmap.mmap:
    """The whole file, mapped read-only and advised onto huge pages (no page is read yet)."""
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    if huge_pages_possible():
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a filesystem or kernel without file THP: 4 KiB pages, same results
            pass
    return buffer


def huge_pages_possible() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def populate(buffer: mmap.mmap) -> None:
    """Fault every page in now, so the first step does not pay for it."""
    try:
        buffer.madvise(MADV_POPULATE_READ)
    except OSError:
        np.frombuffer(buffer, dtype=np.uint8)[::mmap.PAGESIZE].sum()  # one read per page


def huge_page_share(buffer: mmap.mmap) -> float | None:
    """The part of this map's resident bytes that sit on 2 MiB pages (None if unknown)."""
    address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    try:
        with open("/proc/self/smaps") as smaps:
            inside, resident, huge = False, None, None
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and ":" not in fields[0]:  # a new map's first line: "start-end perms ..."
                    if inside:
                        break
                    start, end = (int(part, 16) for part in fields[0].split("-"))
                    inside = start <= address < end
                elif inside and fields[0] == "Rss:":
                    resident = int(fields[1])
                elif inside and fields[0] == "FilePmdMapped:":
                    huge = int(fields[1])
    except OSError:
        return None
    if not resident or huge is None:
        return None
    return huge / resident


def possible_huge_page_share(n_bytes: int) -> float:
    return (n_bytes // HUGE_PAGE * HUGE_PAGE) / n_bytes


def settle_on_huge_pages(buffer: mmap.mmap, path: str | os.PathLike) -> str | None:
    """Fault the whole map in; if it landed on small pages, drop the file's cached pages and
    fault it in again from disk, onto 2 MiB pages. Returns a line saying what it did, or
    None when nothing was worth saying."""
    populate(buffer)
    if len(buffer) < SMALLEST_WORTH_SETTLING or not huge_pages_possible() or not hasattr(os, "posix_fadvise"):
        return None
    before = huge_page_share(buffer)
    if before is None or before >= HUGE_PAGE_SHARE_WANTED * possible_huge_page_share(len(buffer)):
        return None
    # Unmap our pages, then ask the kernel to forget the file's cached pages; pages another
    # process still maps stay, so this never disturbs anyone else's view of the file.
    try:
        buffer.madvise(mmap.MADV_DONTNEED)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(descriptor)  # a freshly written file's dirty pages cannot be dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    except OSError:  # a filesystem that will not sync or drop pages: keep the small ones
        pass
    populate(buffer)
    after = huge_page_share(buffer)
    if after is None or after <= before or len(buffer) < SMALLEST_WORTH_SAYING:
        return None  # nothing gained (this filesystem keeps file pages small), or too quick to mention
    return (f"{path}: reloaded onto 2 MiB pages for faster streaming "
            f"({100 * before:.0f}% -> {100 * after:.0f}% of it)")
