"""llmtp: Llama-architecture models split across worker processes (tensor parallelism over ZeroMQ).

The repository's top-level folders are this package's subpackages: `common/` (the math,
file formats, the wire, cluster configs), `worker/` and `coordinator/` (pyproject.toml maps
them under `llmtp.`)."""

import os

# OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each product before they sleep,
# and on every core llmtp's own kernel threads need: the step after a BLAS call (the first one
# after the start-up warm-up, a decode after a prefill) then ran 3-10x slower. 2^20 cycles
# (~0.3 ms) still spans the gaps between one prefill's products. Read when OpenBLAS loads, so
# it takes effect where llmtp is imported before numpy (every llmtp command and worker); a
# value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__version__ = "0.2.0"
