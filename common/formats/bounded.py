"""Reading a small input file without trusting it: a size cap before the bytes are read.

A path may name /dev/zero, a FIFO or a 50 GB file given by mistake; tokenizers, manifests and
state files are small, so anything past the cap is refused before it is held in memory."""

from pathlib import Path

from llmtp.common.errors import FormatError

# The largest tokenizer file in use (Llama 3's tokenizer.json) is about 9 MB.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The whole of `path`, refused in one line if it is longer than `limit` bytes."""
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as error:
        raise FormatError(f"cannot read {what} {path}: {error.strerror}") from None
    if len(data) > limit:
        raise FormatError(f"{what} {path} is larger than {limit // (1024 * 1024)} MiB: not a {what}")
    return data
