"""llmtp: Llama-architecture models split across worker processes (tensor parallelism over ZeroMQ).

The repository's top-level folders are this package's subpackages: `common/` (the math,
file formats, the wire, cluster configs), `worker/` and `coordinator/` (pyproject.toml maps
them under `llmtp.`)."""

__version__ = "0.2.0"
