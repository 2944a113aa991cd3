"""A GGUF file's tokenizer (tokenizer.ggml.*) rebuilt as a Hugging Face `tokenizers` Tokenizer.

  model 'llama': SentencePiece BPE given as pieces and scores. SentencePiece merges the
      adjacent pair whose joined piece scores highest; a BPE with every (left, right) split of
      every normal piece as a merge, ranked by the joined piece's score, does the same
      (transformers' convert_slow_tokenizer builds Llama's tokenizer.json so). Byte fallback
      to <0xXX> pieces; the normalizer adds the dummy prefix and spells spaces '▁'.
  model 'gpt2': byte-level BPE given as tokens and merges, with the pre-tokenizer that
      tokenizer.ggml.pre names (llama.cpp's list; the supported ones below).
Control and user-defined tokens become added tokens, so written in a prompt they map to
their ids.
"""

from typing import Any

from llmtp.common.errors import FormatError

from .hf_tokenizer import HfTokenizer, TokenizerInfo

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
# GPT-2's split pattern, which ByteLevel(use_regex=True) applies
BYTE_LEVEL_PRE = ("gpt2", "default")
DIGITS_THEN_BYTE_LEVEL_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell")
# Llama 3's split pattern (its tokenizer.json), applied before byte-level mapping without GPT-2's
LLAMA3_PRE = ("llama-bpe", "llama3")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(meta: dict[str, Any], source: str) -> HfTokenizer:
    """meta: the file's metadata including the tokenizer arrays (gguf_file.metadata(reader, True))."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise FormatError(f"{source}: no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types, source)
        default_add_bos = True
    elif model == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, source)
        default_add_bos = False
    else:
        raise FormatError(f"{source}: tokenizer.ggml.model {model!r} is not supported (supported: 'llama', 'gpt2')")
    _add_special_tokens(tokenizer, tokens, types)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        if value is not None and not 0 <= value < len(tokens):
            raise FormatError(f"{source}: tokenizer.ggml.{key} {value} is outside the {len(tokens)} tokens")
    stops = tuple(meta[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if key in meta)
    info = TokenizerInfo(bos_id, eos_id, bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                         stops, meta.get("tokenizer.chat_template"))
    return HfTokenizer(tokenizer, source, info)


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.scores is missing or not one per token")
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    normal = {token: token_id for token, token_id in vocab.items() if types[token_id] in (NORMAL, UNKNOWN)}
    merges = []
    for piece, piece_id in normal.items():
        if types[piece_id] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-scores[piece_id], piece_id, normal[left], left, right))
    merges.sort()
    unk_ids = [token_id for token_id, kind in enumerate(types) if kind == UNKNOWN]
    bpe = models.BPE(vocab, [(left, right) for *_, left, right in merges], byte_fallback=True,
                     unk_token=tokens[unk_ids[0]] if unk_ids else None, fuse_unk=True)
    tokenizer = Tokenizer(bpe)
    steps = []
    if meta.get("tokenizer.ggml.remove_extra_whitespaces", False):
        # SentencePiece drops leading, trailing and repeated spaces (U+0020 only) first
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if add_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decoder_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decoder_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decoder_steps)
    return tokenizer


def _byte_level_bpe(meta: dict, tokens: list[str], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise FormatError(f"{source}: tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its merges)")
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space:
            raise FormatError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        pairs.append((left, right))
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in BYTE_LEVEL_PRE:
        pre_tokenizer = byte_level
    elif pre in DIGITS_THEN_BYTE_LEVEL_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise FormatError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                          f"{', '.join(BYTE_LEVEL_PRE + DIGITS_THEN_BYTE_LEVEL_PRE + LLAMA3_PRE)})")
    tokenizer = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    specials = [AddedToken(token, special=True, normalized=False) for token, kind in zip(tokens, types)
                if kind == CONTROL]
    user = [AddedToken(token, special=False, normalized=False) for token, kind in zip(tokens, types)
            if kind == USER_DEFINED]
    if specials:
        tokenizer.add_special_tokens(specials)
    if user:
        tokenizer.add_tokens(user)
