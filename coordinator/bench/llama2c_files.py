"""What `llmtp bench --llama2c DIR` hands llama2.c's programs, each written once into the cache:
a version 0 file of the measured weights (the only format run.c reads; the presets are version 1),
a version 2 copy (runq.c's, its group size as `llmtp convert --version 2` picks it), and a
synthetic tokenizer.bin of the model's vocabulary size with a prompt text that encodes to exactly
the wanted number of tokens.

The synthetic vocabulary: <unk>, <s>, </s>, then "▁" (run.c's dummy prefix), the letters a-z,
and fillers "<tN>". No piece is the concatenation of two others, so run.c merges nothing and a
prompt of k letters encodes to BOS, the dummy prefix and k letters: k + 2 tokens (checked against
llmtp's own tokenizer, which follows run.c's encode)."""

import string
import sys
from pathlib import Path

from llmtp.common.errors import ConfigError

LETTERS = string.ascii_lowercase
FIRST_LETTER_ID = 4  # after <unk>, <s>, </s> and the dummy prefix "▁"


def _cache_name(source: Path, tail: str) -> Path:
    from ..local_cluster import cache_dir
    stat = source.stat()
    return cache_dir() / "bench" / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}-{tail}"


def llama2c_copy(source: Path, version: int) -> Path:
    """`source` (any model load_model reads) as a llama2.c file of `version` (0 or 2) in the cache;
    a version 0 source is used as it is for version 0."""
    from llmtp.common.formats.llama2c_export import check_fits_llama2c
    from llmtp.common.formats.checkpoint import write_checkpoint
    from llmtp.common.formats.load import LLAMA2C, load_model
    from llmtp.common.errors import FormatError
    path = _cache_name(source, f"llama2c-v{version}.bin")
    if path.exists():
        return path
    model = load_model(source)
    if version == 0 and model.source_format == LLAMA2C and model.source.version == 0:
        return source
    try:
        check_fits_llama2c(model)
    except FormatError as error:
        raise ConfigError(f"--llama2c: {error}") from None
    print(f"bench: writing {source.name} as llama2.c version {version} to {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, model.config, model.weights, version)  # under a temporary name, then renamed
    return path


def synthetic_pieces(vocab_size: int) -> list[str]:
    if vocab_size < FIRST_LETTER_ID + len(LETTERS):
        raise ConfigError(f"--llama2c: a vocabulary of {vocab_size} tokens is too small for the synthetic "
                          f"tokenizer.bin (it needs {FIRST_LETTER_ID + len(LETTERS)})")
    pieces = ["<unk>", "<s>", "</s>", "\u2581", *LETTERS]
    return pieces + [f"<t{i}>" for i in range(len(pieces), vocab_size)]


def synthetic_tokenizer(vocab_size: int) -> Path:
    """A tokenizer.bin of `vocab_size` pieces (scores all 0) in the cache, written on first use."""
    from llmtp.common.formats.tokenizer_bin import encode_tokenizer_bin, write_atomically

    from ..local_cluster import cache_dir
    path = cache_dir() / "bench" / f"synthetic-tokenizer-{vocab_size}.bin"
    if not path.exists():
        pieces = synthetic_pieces(vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, encode_tokenizer_bin(pieces, [0.0] * len(pieces)))
    return path


def prompt_text(n_tokens: int) -> str:
    """Text that the synthetic tokenizer encodes (with BOS) to exactly n_tokens tokens."""
    if n_tokens == 1:
        return ""  # BOS alone: an empty text has no dummy prefix
    if n_tokens == 2:  # a text's first letter always comes with the dummy prefix
        raise ConfigError("--llama2c: a 2-token prompt cannot be spelled (BOS, then the dummy prefix and a letter)")
    return "".join(LETTERS[i % len(LETTERS)] for i in range(n_tokens - 2))


def check_prompt(tokenizer_path: Path, vocab_size: int, text: str, n_tokens: int) -> None:
    """The prompt encodes to n_tokens ids, as llmtp's tokenizer (run.c's encode) reads it."""
    from llmtp.common.formats.tokenizer import load_tokenizer
    ids = load_tokenizer(tokenizer_path, vocab_size).encode(text, bos=True)
    assert len(ids) == n_tokens, (text, ids)
