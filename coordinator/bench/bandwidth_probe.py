"""`python -m llmtp.coordinator.bench.bandwidth_probe MIB`: print the GB/s of a float32
matrix-vector product over a MIB-sized matrix (best of 8), with the BLAS threads the
environment sets (llmtp's kernels take the same count). A process of its own, so that the
thread count takes effect.

The faster of two readers: BLAS's sgemv and llmtp's float32 kernel where it runs (one row at a
time, one sequential stream; 41.6 GB/s of weights in a 110M decode on 2 cores where sgemv
streamed 30.1, so a limit from sgemv alone put that decode at 138% of it)."""

import sys
import time

import numpy as np

from llmtp.common import kernels


def main(probe_mib: int) -> float:
    rows = probe_mib * 2**20 // (4 * 16384)
    matrix = np.ones((rows, 16384), dtype=np.float32)  # 1 GiB by default: larger than the caches
    vector = np.ones(16384, dtype=np.float32)
    readers = [lambda: matrix @ vector]
    if kernels.has_f32_kernel():
        readers.append(lambda: kernels.matmul_f32(matrix, vector[None]))
    best = 1e9
    for _ in range(8):
        for read in readers:
            started = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - started)
    return matrix.nbytes / best / 1e9


if __name__ == "__main__":
    print(main(int(sys.argv[1])))
