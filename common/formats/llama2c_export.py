"""A model of any format written as a llama2.c checkpoint (and its tokenizer.bin), when the
model fits what run.c can run: RoPE theta 10000, RMSNorm eps 1e-5, and a SentencePiece-style
vocabulary with scores (run.c merges by them) whose BOS/EOS are 1/2.

Everything that could refuse is checked before the first byte is written, so a model that
does not fit leaves no file behind, and the tokenizer.bin is built in memory first."""

from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import FormatError
from llmtp.common.model.config import LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA

from .checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from .load import GGUF, HUGGING_FACE, LoadedModel
from .tokenizer_bin import encode_tokenizer_bin, sentencepiece_vocabulary, write_atomically


@dataclass(frozen=True)
class Vocabulary:
    """What a tokenizer.bin holds: one piece and score per token id."""

    pieces: list[str]
    scores: list[float]
    bos_id: int
    eos_id: int
    source: str


def check_fits_llama2c(model: LoadedModel) -> None:
    """FormatError naming the first field a llama2.c header cannot carry."""
    for name, fixed in (("rope_theta", LLAMA2C_ROPE_THETA), ("norm_eps", LLAMA2C_NORM_EPS)):
        value = getattr(model.config, name)
        if value != fixed:
            raise FormatError(f"{model.path}: {name} is {value!r}; a llama2.c file cannot hold it "
                              f"(run.c fixes it at {fixed!r})")


def model_vocabulary(model: LoadedModel) -> Vocabulary | None:
    """The vocabulary to export as tokenizer.bin; None for a llama2.c input (its tokenizer lies
    beside it already). FormatError when the model's tokenizer cannot be one."""
    if model.source_format == GGUF:
        from .gguf_file import metadata
        vocabulary = Vocabulary(*sentencepiece_vocabulary(metadata(model.source.reader, include_arrays=True),
                                                          str(model.path)), source=str(model.path))
    elif model.source_format == HUGGING_FACE:
        vocabulary = _folder_vocabulary(model.path)
    else:
        return None
    if len(vocabulary.pieces) != model.config.vocab_size:  # run.c reads exactly vocab_size entries
        raise FormatError(f"{vocabulary.source}: the tokenizer has {len(vocabulary.pieces)} tokens and the model "
                          f"{model.config.vocab_size} embedding rows; a tokenizer.bin must hold exactly one per row")
    return vocabulary


def _folder_vocabulary(folder: Path) -> Vocabulary:
    """Pieces and scores from the folder's tokenizer.model; a tokenizer.json alone has BPE
    merges but no scores, and run.c merges by score."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise FormatError(f"{folder}: no tokenizer.model; its tokenizer.json holds BPE merges without the "
                          f"scores a tokenizer.bin needs (run.c merges by score)")
    import sentencepiece

    from .bounded import MAX_TOKENIZER_BYTES, read_bounded
    processor = sentencepiece.SentencePieceProcessor(
        model_proto=read_bounded(model_file, MAX_TOKENIZER_BYTES, "tokenizer"))
    bos_id, eos_id = processor.bos_id(), processor.eos_id()
    if (bos_id, eos_id) != (1, 2):  # run.c hard-codes them
        raise FormatError(f"{model_file}: BOS/EOS ids are {bos_id}/{eos_id}; run.c needs 1/2")
    n_pieces = processor.get_piece_size()
    return Vocabulary([processor.id_to_piece(i) for i in range(n_pieces)],
                      [processor.get_score(i) for i in range(n_pieces)], bos_id, eos_id, str(model_file))


def tokenizer_bin_bytes(model: LoadedModel) -> bytes | None:
    """The tokenizer.bin of a model that carries its tokenizer; None for a llama2.c input."""
    vocabulary = model_vocabulary(model)
    return None if vocabulary is None else encode_tokenizer_bin(vocabulary.pieces, vocabulary.scores,
                                                                vocabulary.bos_id, vocabulary.eos_id)


def export_llama2c(model: LoadedModel, out_path: Path, version: int, group_size: int | None,
                   tokenizer: tuple[Path, bytes] | None = None) -> Checkpoint:
    """Write `model` as a llama2.c file and, given (path, tokenizer_bin_bytes), its tokenizer
    after it. Returns the written checkpoint, loaded back."""
    check_fits_llama2c(model)
    write_checkpoint(out_path, model.config, model.weights, version, group_size)
    if tokenizer is not None:
        write_atomically(*tokenizer)
    return load_checkpoint(out_path)
