"""Llama 2 tokenizer: llama2.c's tokenizer.bin or a SentencePiece .model, encoded like SentencePiece.

Encoding is run.c's BPE (one symbol per codepoint, merge the adjacent pair with the highest
score, leftmost on ties, unknown codepoints fall back to <0xXX> byte pieces), plus the parts of
SentencePiece that run.c leaves out, so that the ids equal `SentencePieceProcessor.encode`:
  - the identity normalizer: dummy-prefix space, and, for models trained with
    remove_extra_whitespaces (llama2.c's own tok*.model files), leading/trailing/repeated
    spaces dropped;
  - only normal pieces take part in merges: "<s>" or "<0x0A>" typed in the text stays
    characters, never a control or byte id;
  - a literal U+2581 ('▁') in the text is the same symbol as a space.
Decoding follows run.c (the piece after BOS loses its leading space, byte pieces become raw
bytes) but assembles bytes into UTF-8, with one U+FFFD per invalid byte like SentencePiece.

A tokenizer.bin is read as run.c reads it: a codepoint without a piece becomes token
`byte + 3` for each of its UTF-8 bytes whatever pieces sit there (character-level vocabularies
have no <0xXX> pieces at all), and <unk> prints as its text. A .model keeps SentencePiece's
byte pieces and its " \u2047 " for <unk>.
"""

import codecs
import heapq
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from .bounded import MAX_TOKENIZER_BYTES, read_bounded
from llmtp.common.errors import FormatError

SPACE_SYMBOL = "\u2581"  # SentencePiece writes spaces in pieces as '▁'; llama2.c's .bin as ' '
UNK_SURFACE = " \u2047 "  # what SentencePiece prints for <unk> by default
BOS_PIECE_IN_BIN, EOS_PIECE_IN_BIN = "\n<s>\n", "\n</s>\n"  # how llama2.c's export spells them

NORMAL, CONTROL, UNKNOWN, BYTE = "normal", "control", "unknown", "byte"
RUN_C_BYTE_OFFSET = 3  # run.c's byte fallback: byte b is token b + 3 (after <unk>, BOS, EOS)
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def _replace_each_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    # SentencePiece prints one U+FFFD per invalid byte; Python's "replace" one per bad sequence.
    return "\ufffd" * (error.end - error.start), error.end


_UTF8_ERRORS = "llmtp.replace_each_byte"
codecs.register_error(_UTF8_ERRORS, _replace_each_byte)


def normalize(text: str, add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False) -> str:
    """SentencePiece's identity normalizer, returning spaces as ' ' (the vocabulary's spelling).

    Only U+0020 counts as whitespace to remove, but a literal '▁' in the text already is the
    escaped space, so it survives the leading-space strip and is removed by the trailing one.
    """
    if remove_extra_whitespaces:
        text = re.sub(" +", " ", text.lstrip(" "))
    if not text:
        return ""  # no dummy prefix for empty input
    escaped = text.replace(" ", SPACE_SYMBOL)
    if add_dummy_prefix:
        escaped = SPACE_SYMBOL + escaped
    if remove_extra_whitespaces:
        escaped = escaped.rstrip(SPACE_SYMBOL)
    return escaped.replace(SPACE_SYMBOL, " ")


def merge_symbols(symbols: list[str], merges: dict[str, tuple[float, int]]) -> list[str]:
    """BPE: repeatedly join the adjacent pair whose concatenation has the highest score.

    `merges` maps a mergeable piece to (score, id). Ties go to the leftmost pair. A heap of
    candidate pairs over a linked list of symbols; a popped pair is stale when either side has
    since changed (a merged-away symbol is emptied, a grown one no longer adds up to the pair).
    """
    symbols = list(symbols)
    next_index = list(range(1, len(symbols))) + [-1]
    prev_index = list(range(-1, len(symbols) - 1))
    candidates: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

    def add_candidate(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        merged = symbols[left] + symbols[right]
        if merged in merges:
            heapq.heappush(candidates, (-merges[merged][0], left, right, len(merged)))

    for left in range(len(symbols) - 1):
        add_candidate(left, left + 1)
    while candidates:
        _, left, right, merged_length = heapq.heappop(candidates)
        if not symbols[left] or not symbols[right]:
            continue  # one side was merged away since this pair was pushed
        if len(symbols[left]) + len(symbols[right]) != merged_length:
            continue  # one side has grown (pieces only grow, so equal lengths mean unchanged)
        symbols[left] += symbols[right]
        symbols[right] = ""
        next_index[left] = next_index[right]
        if next_index[right] >= 0:
            prev_index[next_index[right]] = left
        add_candidate(prev_index[left], left)
        add_candidate(left, next_index[left])
    return [symbol for symbol in symbols if symbol]


class Tokenizer:
    """A vocabulary (pieces spelled as in tokenizer.bin, scores, kinds) and its encode/decode."""

    bos_id = 1
    eos_id = 2
    stop_ids = (1, 2)  # run.c stops on BOS; EOS ends a story too
    unk_id = 0

    def __init__(self, pieces: list[str], scores: list[float], kinds: list[str], source: str,
                 add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False, run_c_bytes: bool = False):
        """run_c_bytes: byte fallback and <unk> as run.c has them for a tokenizer.bin (see the module doc)."""
        assert len(pieces) == len(scores) == len(kinds)
        self.pieces = tuple(pieces)
        self.scores = tuple(scores)
        self.vocab_size = len(pieces)
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self._kinds = tuple(kinds)
        self._run_c_bytes = run_c_bytes
        self._merges = _mergeable_pieces(pieces, scores, kinds)
        self._byte_ids = _run_c_byte_ids(len(pieces), source) if run_c_bytes else _byte_piece_ids(pieces, kinds, source)
        # what each id prints as, filled in as ids are first printed: a stream prints a few
        # hundred distinct ids, and spelling all 32000 up front was a fifth of loading one
        self._surfaces: list[bytes | None] = [None] * len(pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        normalized = normalize(text, self.add_dummy_prefix, self.remove_extra_whitespaces)
        ids = [self.bos_id] if bos else []
        for symbol in merge_symbols(list(normalized), self._merges):
            if symbol in self._merges:
                ids.append(self._merges[symbol][1])
            else:  # a codepoint with no piece of its own: spell it as UTF-8 byte pieces
                # (surrogateescape: undecodable bytes of a command-line argument stay those bytes)
                ids.extend(self._byte_ids[byte] for byte in symbol.encode("utf-8", errors="surrogateescape"))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        chunks = []
        previous_id = None
        for token_id in ids:
            chunks.append(self.piece_bytes(token_id, previous_id))
            previous_id = token_id
        return b"".join(chunks).decode("utf-8", errors=_UTF8_ERRORS)

    def stream_decoder(self, previous_id: int | None = None) -> "StreamDecoder":
        """previous_id: the token before the first pushed (only it shapes the first piece)."""
        return StreamDecoder(self, previous_id)

    def piece_bytes(self, token_id: int, previous_id: int | None) -> bytes:
        """What `token_id` prints as when it follows `previous_id` (None: first token)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        surface = self._surfaces[token_id]
        if surface is None:
            surface = self._surfaces[token_id] = _surface_bytes(self.pieces[token_id], self._kinds[token_id],
                                                                self._run_c_bytes)
        if previous_id == self.bos_id and self._kinds[token_id] != BYTE and surface.startswith(b" "):
            return surface[1:]  # run.c: the dummy-prefix space of the first word is not printed
        return surface


class StreamDecoder:
    """Turns token ids into text as it completes, holding back unfinished UTF-8 sequences.

    The concatenation of all push() results and flush() equals Tokenizer.decode of the ids.
    """

    def __init__(self, tokenizer: Tokenizer, previous_id: int | None = None):
        """previous_id: the token before the first one pushed (after BOS a first piece drops its
        leading space); only that id shapes what the next piece prints."""
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_UTF8_ERRORS)
        self._previous_id = previous_id

    def push(self, token_id: int) -> str:
        surface = self._tokenizer.piece_bytes(token_id, self._previous_id)
        self._previous_id = token_id
        return self._utf8.decode(surface)

    def flush(self) -> str:
        """Text still held back: an unfinished UTF-8 sequence becomes one U+FFFD per byte."""
        return self._utf8.decode(b"", final=True)


def _mergeable_pieces(pieces, scores, kinds) -> dict[str, tuple[float, int]]:
    # Like SentencePiece, only normal pieces are matched from text; the first id wins a duplicate.
    normal = [token_id for token_id, kind in enumerate(kinds) if kind == NORMAL]
    # built from the last id down, so where a piece repeats the first id's entry is written last
    return {pieces[token_id]: (scores[token_id], token_id) for token_id in reversed(normal)}


def _byte_piece_ids(pieces, kinds, source: str) -> tuple[int, ...]:
    ids_by_value = {int(_BYTE_PIECE.fullmatch(piece).group(1), 16): token_id
                    for token_id, (piece, kind) in enumerate(zip(pieces, kinds)) if kind == BYTE}
    missing = [value for value in range(256) if value not in ids_by_value]
    if missing:
        raise FormatError(f"tokenizer {source} lacks {len(missing)} of the 256 byte pieces "
                          f"(first: <0x{missing[0]:02X}>) that byte fallback needs")
    return tuple(ids_by_value[value] for value in range(256))


def _run_c_byte_ids(n_pieces: int, source: str) -> tuple[int, ...]:
    if n_pieces < RUN_C_BYTE_OFFSET + 256:
        raise FormatError(f"tokenizer {source} has {n_pieces} tokens, too few for byte fallback: a byte b is "
                          f"token b + {RUN_C_BYTE_OFFSET} (<0x00> is token {RUN_C_BYTE_OFFSET}, <0xFF> token "
                          f"{RUN_C_BYTE_OFFSET + 255}), as in run.c")
    return tuple(range(RUN_C_BYTE_OFFSET, RUN_C_BYTE_OFFSET + 256))


def _surface_bytes(piece: str, kind: str, run_c: bool = False) -> bytes:
    if kind == BYTE:
        return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
    if kind == CONTROL:
        return b""
    if kind == UNKNOWN:
        return piece.encode("utf-8") if run_c else UNK_SURFACE.encode("utf-8")
    return piece.encode("utf-8")


def load_tokenizer(path, vocab_size: int | None = None, *,
                   remove_extra_whitespaces: bool | None = None, allow_longer: bool = True) -> Tokenizer:
    """Read llama2.c's tokenizer.bin or a SentencePiece .model (by extension or content).

    vocab_size: how many tokens the model has; a file with more is cut there (as run.c reads
    only the first vocab_size entries), unless allow_longer is False: then a longer file is
    refused as probably another model's tokenizer; one with fewer is an error. None reads
    the whole file.
    remove_extra_whitespaces: the normalizer setting, which a .model file states and a
    tokenizer.bin does not. None guesses it for a .bin: a model trained on text whose runs of
    spaces were collapsed has no piece with two spaces in a row (llama2.c's tok512 has none,
    Llama 2 has many). Ignored for a .model.
    """
    path = Path(path)
    data = read_bounded(path, MAX_TOKENIZER_BYTES, "tokenizer")
    if path.suffix == ".model" or data[:1] == data[2:3] == b"\x0a":  # protobuf: field 1, field 1
        return _load_sentencepiece(path, data, vocab_size, allow_longer)
    pieces, scores = _read_bin(path, data, vocab_size, allow_longer)
    kinds = _bin_piece_kinds(pieces)
    if remove_extra_whitespaces is None:
        remove_extra_whitespaces = not any("  " in piece for piece, kind in zip(pieces, kinds)
                                           if kind == NORMAL)
    return Tokenizer(pieces, scores, kinds, str(path), add_dummy_prefix=True,
                     remove_extra_whitespaces=remove_extra_whitespaces, run_c_bytes=True)


def _longer_than_the_model(path: Path, holds: str, vocab_size: int) -> FormatError:
    return FormatError(f"tokenizer {path} holds {holds} than the model's {vocab_size}: it is probably another "
                       f"model's tokenizer (run.c would read the first {vocab_size}; --any-tokenizer does the same)")


def _read_bin(path: Path, data: bytes, vocab_size: int | None,
              allow_longer: bool = True) -> tuple[list[str], list[float]]:
    """tokenizer.bin: uint32 max_token_length, then per token float32 score, int32 length, bytes.

    The file does not say how many tokens it holds: read `vocab_size`, or to the end if None.
    """
    if len(data) < 4:
        raise FormatError(f"tokenizer {path} is {len(data)} bytes, shorter than its 4-byte header")
    (max_token_length,) = struct.unpack_from("<I", data, 0)
    raw: list[bytes] = []
    scores: list[float] = []
    offset, n_bytes = 4, len(data)
    score_and_length = struct.Struct("<fi").unpack_from
    # one loop without calls of its own: 32000 pieces are read before every first token;
    # anything out of place goes to _bin_token_fault, which says what is wrong
    while len(raw) != vocab_size and (vocab_size is not None or offset < n_bytes):
        if offset == n_bytes:
            raise FormatError(f"tokenizer {path} has {len(raw)} tokens "
                              f"but the model's vocabulary needs {vocab_size}")
        if offset + 8 > n_bytes:
            raise _bin_token_fault(data, offset, len(raw), max_token_length, path)
        score, length = score_and_length(data, offset)
        start, offset = offset + 8, offset + 8 + length
        if not 0 <= length <= max_token_length or offset > n_bytes:
            raise _bin_token_fault(data, start - 8, len(raw), max_token_length, path)
        raw.append(data[start:offset])
        scores.append(score)
    if not allow_longer and offset < n_bytes:
        raise _longer_than_the_model(path, "more tokens", vocab_size)
    try:
        pieces = [piece.decode("utf-8") for piece in raw]
    except UnicodeDecodeError:
        bad = next(token_id for token_id, piece in enumerate(raw) if not _is_utf8(piece))
        raise FormatError(f"tokenizer {path}: token {bad} is not valid UTF-8: {raw[bad]!r}") from None
    return pieces, scores


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bin_token_fault(data: bytes, offset: int, token_id: int, max_token_length: int, path: Path) -> FormatError:
    """What is wrong with the token whose score starts at `offset` (the loop found it out of place)."""
    if offset + 8 > len(data):
        return FormatError(f"tokenizer {path} is truncated: token {token_id}'s 8-byte score and length "
                           f"start at byte {offset} but the file ends at byte {len(data)}")
    _, length = struct.unpack_from("<fi", data, offset)
    if not 0 <= length <= max_token_length:
        return FormatError(f"tokenizer {path}: token {token_id} is {length} bytes long, "
                           f"expected 0..{max_token_length} (the header's max_token_length)")
    start, end = offset + 8, offset + 8 + length
    return FormatError(f"tokenizer {path} is truncated: token {token_id} needs bytes {start}..{end} "
                       f"but the file ends at byte {len(data)}")


def _bin_piece_kinds(pieces: list[str]) -> list[str]:
    # A .bin has no piece types; llama2.c's export keeps SentencePiece's layout:
    # 0 <unk>, 1 BOS, 2 EOS, then <0x00>..<0xFF> at ids 3..258.
    kinds = [NORMAL] * len(pieces)
    for token_id, piece in enumerate(pieces[:3 + 256]):
        if token_id == Tokenizer.unk_id:
            kinds[token_id] = UNKNOWN
        elif token_id in (Tokenizer.bos_id, Tokenizer.eos_id):
            kinds[token_id] = CONTROL
        elif token_id >= 3 and piece == f"<0x{token_id - 3:02X}>":
            kinds[token_id] = BYTE
    return kinds


def _load_sentencepiece(path: Path, data: bytes, vocab_size: int | None, allow_longer: bool = True) -> Tokenizer:
    import sentencepiece  # only needed for .model files

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FormatError(f"tokenizer {path} is not a readable SentencePiece model: {reason}") from None
    n_pieces = processor.get_piece_size()
    if vocab_size is not None and n_pieces < vocab_size:
        raise FormatError(f"tokenizer {path} has {n_pieces} tokens "
                          f"but the model's vocabulary needs {vocab_size}")
    if vocab_size is not None and n_pieces > vocab_size and not allow_longer:
        raise _longer_than_the_model(path, f"{n_pieces} tokens, more", vocab_size)
    if (processor.unk_id(), processor.bos_id(), processor.eos_id()) != (0, 1, 2):
        raise FormatError(f"tokenizer {path}: expected <unk>, BOS, EOS at ids 0, 1, 2, got "
                          f"{processor.unk_id()}, {processor.bos_id()}, {processor.eos_id()}")
    pieces, scores, kinds = [], [], []
    for token_id in range(n_pieces if vocab_size is None else vocab_size):
        kinds.append(_sentencepiece_kind(processor, token_id, path))
        pieces.append(_bin_spelling(processor.id_to_piece(token_id), token_id))
        scores.append(processor.get_score(token_id))
    add_dummy_prefix, remove_extra_whitespaces = _normalizer_settings(processor, path)
    return Tokenizer(pieces, scores, kinds, str(path), add_dummy_prefix, remove_extra_whitespaces)


def _sentencepiece_kind(processor, token_id: int, path: Path) -> str:
    if processor.is_unused(token_id):
        raise FormatError(f"tokenizer {path}: piece {token_id} is of type UNUSED, which this runtime "
                          f"does not support")
    if processor.is_byte(token_id):
        return BYTE
    if processor.is_control(token_id):
        return CONTROL
    if processor.is_unknown(token_id):
        return UNKNOWN
    return NORMAL


def _bin_spelling(piece: str, token_id: int) -> str:
    """Spell a SentencePiece piece as llama2.c's export writes it into tokenizer.bin."""
    if token_id == Tokenizer.bos_id:
        return BOS_PIECE_IN_BIN
    if token_id == Tokenizer.eos_id:
        return EOS_PIECE_IN_BIN
    return piece.replace(SPACE_SYMBOL, " ")


# Probes the normalizer through its behaviour (sentencepiece_model_pb2 would need protobuf).
_NORMALIZER_PROBE = "  A\u00a0b\uff21\u2460\u3000\u00e9e\u0301\tc  \u2581 "


def _normalizer_settings(processor, path: Path) -> tuple[bool, bool]:
    if not hasattr(processor, "normalize"):
        import sentencepiece
        raise FormatError(f"tokenizer {path}: reading a .model needs sentencepiece >= 0.2.0 "
                          f"(SentencePieceProcessor.normalize), found {sentencepiece.__version__}")
    add_dummy_prefix = processor.normalize("a").startswith(SPACE_SYMBOL)
    remove_extra_whitespaces = processor.normalize("a  a ") in ("a\u2581a", "\u2581a\u2581a")
    ours = normalize(_NORMALIZER_PROBE, add_dummy_prefix, remove_extra_whitespaces)
    theirs = processor.normalize(_NORMALIZER_PROBE).replace(SPACE_SYMBOL, " ")
    if ours != theirs:  # e.g. NFKC folding, which only the identity normalizer skips
        raise FormatError(f"tokenizer {path}: its normalizer turns {_NORMALIZER_PROBE!r} into {theirs!r}, "
                          f"expected the identity normalizer's {ours!r}")
    return add_dummy_prefix, remove_extra_whitespaces
