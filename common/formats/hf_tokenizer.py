"""Tokenizers run by Hugging Face's `tokenizers` library, behind the interface of tokenizer.py's
Tokenizer (encode with BOS, decode, piece_bytes for streaming, bos/eos ids), plus stop_ids.

Two families, told apart by the tokenizer's decoder:
  - byte-level BPE (GPT-2 style: SmolLM, Llama 3): every byte of the text is one of 256
    printable stand-in characters, which a piece maps back to bytes;
  - SentencePiece-style BPE (Llama 2, TinyLlama, Mistral): '▁' spells a space, <0xXX> pieces
    are raw bytes, and the dummy-prefix space of the first word is not printed.
Special tokens (BOS, EOS, <|im_start|>, ...) written in the text map to their ids, as
transformers does; BOS and EOS print as nothing, other special tokens as their text.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import FormatError

from .tokenizer import SPACE_SYMBOL, _UTF8_ERRORS, StreamDecoder

BYTE_LEVEL, SENTENCEPIECE_BPE = "byte-level BPE", "SentencePiece-style BPE"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's stand-in character for each byte -> the byte: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_LEVEL_ALPHABET = byte_level_alphabet()


@dataclass(frozen=True)
class TokenizerInfo:
    """What a model's files say beyond tokenizer.json: special ids and flags."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_ids: tuple[int, ...] = ()
    chat_template: str | None = None


class HfTokenizer:
    def __init__(self, tokenizer, source: str, info: TokenizerInfo):
        self.tokenizer = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.kind, self.strips_first_space = _decoding_rules(tokenizer, source)
        self.bos_id, self.eos_id = info.bos_id, info.eos_id
        self.add_bos = info.add_bos and info.bos_id is not None
        self.chat_template = info.chat_template
        added = tokenizer.get_added_tokens_decoder()
        named_stops = {added_id for added_id, token in added.items() if token.content in END_OF_TURN_TOKENS}
        self.stop_ids = tuple(sorted({i for i in (info.eos_id, *info.stop_ids) if i is not None} | named_stops))
        self._surfaces = tuple(self._surface(token_id, added) for token_id in range(self.vocab_size))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """bos: start with BOS if the model's tokenizer adds one (its add-BOS flag)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        chunks, previous_id = [], None
        for token_id in ids:
            chunks.append(self.piece_bytes(token_id, previous_id))
            previous_id = token_id
        return b"".join(chunks).decode("utf-8", errors=_UTF8_ERRORS)

    def stream_decoder(self, previous_id: int | None = None) -> StreamDecoder:
        """previous_id: the token before the first pushed (only it shapes the first piece)."""
        return StreamDecoder(self, previous_id)

    def piece_bytes(self, token_id: int, previous_id: int | None) -> bytes:
        """What `token_id` prints as after `previous_id` (None: first token)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        surface = self._surfaces[token_id]
        starts_text = previous_id is None or (previous_id == self.bos_id and self.bos_id is not None)
        if self.strips_first_space and starts_text and surface.startswith(b" "):
            return surface[1:]  # the dummy prefix the normalizer added
        return surface

    def _surface(self, token_id: int, added: dict) -> bytes:
        if token_id in (self.bos_id, self.eos_id):
            return b""
        if token_id in added:
            return added[token_id].content.encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self.kind == BYTE_LEVEL:
            try:
                return bytes(_BYTE_LEVEL_ALPHABET[char] for char in piece)
            except KeyError:
                raise FormatError(f"tokenizer {self.source}: piece {token_id} {piece!r} is not byte-level "
                                  f"encoded") from None
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")


def _decoding_rules(tokenizer, source: str) -> tuple[str, bool]:
    """(family, whether the first word's leading space is dropped) from the decoder."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = [step.get("type") for step in steps]
    if types == ["ByteLevel"]:
        return BYTE_LEVEL, False
    if "Metaspace" in types:
        metaspace = steps[types.index("Metaspace")]
        scheme = metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space", True) else "never")
        return SENTENCEPIECE_BPE, scheme != "never"
    if any(t == "Replace" and step.get("content") == " " for t, step in zip(types, steps)):
        return SENTENCEPIECE_BPE, any(t == "Strip" and step.get("start", 0) >= 1 for t, step in zip(types, steps))
    raise FormatError(f"tokenizer {source}: decoder {types} is neither byte-level nor SentencePiece-style")


# ---------------------------------------------------------------------------------------------
# from a Hugging Face folder


def load_hf_tokenizer(folder: str | Path) -> HfTokenizer:
    """tokenizer.json, with BOS/EOS and the add-BOS flag from tokenizer_config.json,
    config.json and generation_config.json where they say so."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FormatError(f"{folder}: no tokenizer.json (a tokenizer.model alone is not supported here)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises plain Exception subclasses for bad files
        raise FormatError(f"{path}: not a readable tokenizer.json ({str(error).splitlines()[0]})") from None
    settings = _read_json(folder / "tokenizer_config.json")
    model_config = {**_read_json(folder / "config.json"), **_read_json(folder / "generation_config.json")}

    def token_id(name: str) -> int | None:
        token = settings.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
        value = model_config.get(f"{name}_id")
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    eos_ids = model_config.get("eos_token_id")
    stop_ids = tuple(eos_ids) if isinstance(eos_ids, list) else (eos_ids,) if isinstance(eos_ids, int) else ()
    if "add_bos_token" in settings:
        add_bos = bool(settings["add_bos_token"])
    else:  # what the file's own post-processor does
        with_specials = tokenizer.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id]
    template = settings.get("chat_template")
    info = TokenizerInfo(bos_id, eos_id, add_bos, stop_ids, template if isinstance(template, str) else None)
    return HfTokenizer(tokenizer, str(path), info)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise FormatError(f"{path}: not readable JSON ({type(error).__name__})") from None
    return value if isinstance(value, dict) else {}
