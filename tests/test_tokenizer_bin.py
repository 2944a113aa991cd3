"""tokenizer.bin exported from a GGUF's SentencePiece-style vocabulary: byte for byte the file
llama2.c's export made from the same .model (../shared/models/stories260K/tok512.bin)."""

from pathlib import Path

import pytest

pytest.importorskip("gguf")

from llmtp.common.errors import FormatError  # noqa: E402
from llmtp.common.formats.tokenizer_bin import sentencepiece_vocabulary, write_tokenizer_bin  # noqa: E402

from gguf_factory import sentencepiece_metadata  # noqa: E402
from test_hf_tokenizer import as_meta  # noqa: E402

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


def test_tok512_bin_is_llama2c_export(tmp_path):
    if not (STORIES / "tok512.bin").is_file():
        pytest.skip("stories260K is absent")
    meta = as_meta(sentencepiece_metadata(STORIES / "tok512.model"))
    written = write_tokenizer_bin(tmp_path / "tokenizer.bin", *sentencepiece_vocabulary(meta, "m.gguf"))
    assert written.read_bytes() == (STORIES / "tok512.bin").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_byte_level_vocabulary_refused():
    with pytest.raises(FormatError, match="tokenizer.ggml.model is 'gpt2'"):
        sentencepiece_vocabulary({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    with pytest.raises(FormatError, match="bos_token_id/eos_token_id are 0/2"):
        sentencepiece_vocabulary({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"],
                                  "tokenizer.ggml.scores": [0.0], "tokenizer.ggml.bos_token_id": 0}, "m.gguf")
