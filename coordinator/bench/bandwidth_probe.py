"""`python -m llmtp.coordinator.bench.bandwidth_probe MIB`: print the GB/s of a float32
matrix-vector product over a MIB-sized matrix (best of 8), with the BLAS threads the
environment sets. A process of its own, so that the thread count takes effect."""

import sys
import time

import numpy as np


def main(probe_mib: int) -> float:
    rows = probe_mib * 2**20 // (4 * 16384)
    matrix = np.ones((rows, 16384), dtype=np.float32)  # 1 GiB by default: larger than the caches
    vector = np.ones(16384, dtype=np.float32)
    best = 1e9
    for _ in range(8):
        started = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - started)
    return matrix.nbytes / best / 1e9


if __name__ == "__main__":
    print(main(int(sys.argv[1])))
