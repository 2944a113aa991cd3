"""Tokenizers from GGUF metadata and from tokenizer.json, against independent oracles:
sentencepiece for SentencePiece-style vocabularies, the `tokenizers` library loading the same
tokenizer.json for byte-level BPE; special tokens in text, decode, streaming."""

import json
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

from llmtp.common.errors import FormatError  # noqa: E402
from llmtp.common.formats.gguf_tokenizer import gguf_tokenizer  # noqa: E402
from llmtp.common.formats.hf_tokenizer import BYTE_LEVEL, SENTENCEPIECE_BPE, load_hf_tokenizer  # noqa: E402

from gguf_factory import sentencepiece_metadata, tokenizer_json_metadata  # noqa: E402
from tokenizer_strings import varied_strings  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SENTENCEPIECE_MODELS = {"tok512": MODELS / "stories260K" / "tok512.model",
                        "llama2": MODELS / "llama2-tokenizer" / "tokenizer.model"}
STRINGS = varied_strings()
SPECIAL_FREE = [s for s in STRINGS if "<s>" not in s and "</s>" not in s and "<unk>" not in s]


def as_meta(tok: dict) -> dict:
    """The metadata keys a GGUF file holds for gguf_factory's tokenizer dict."""
    keys = {"model": "tokenizer.ggml.model", "pre": "tokenizer.ggml.pre", "tokens": "tokenizer.ggml.tokens",
            "scores": "tokenizer.ggml.scores", "token_types": "tokenizer.ggml.token_type",
            "merges": "tokenizer.ggml.merges", "bos_id": "tokenizer.ggml.bos_token_id",
            "eos_id": "tokenizer.ggml.eos_token_id", "unk_id": "tokenizer.ggml.unknown_token_id",
            "add_bos": "tokenizer.ggml.add_bos_token",
            "remove_extra_whitespaces": "tokenizer.ggml.remove_extra_whitespaces"}
    return {keys[key]: value for key, value in tok.items()}


def streamed(tokenizer, ids) -> str:
    decoder = tokenizer.stream_decoder()
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


# ---------------------------------------------------------------------------------------------
# SentencePiece-style (GGUF model 'llama') against sentencepiece


@pytest.fixture(scope="module", params=sorted(SENTENCEPIECE_MODELS))
def sentencepiece_pair(request):
    path = SENTENCEPIECE_MODELS[request.param]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    import sentencepiece
    return (sentencepiece.SentencePieceProcessor(model_file=str(path)),
            gguf_tokenizer(as_meta(sentencepiece_metadata(path)), str(path)))


def test_sentencepiece_ids_equal(sentencepiece_pair):
    processor, ours = sentencepiece_pair
    assert ours.kind == SENTENCEPIECE_BPE
    mismatches = [(s, ours.encode(s, bos=False), processor.encode(s))
                  for s in SPECIAL_FREE if ours.encode(s, bos=False) != processor.encode(s)]
    assert not mismatches, mismatches[:3]
    assert ours.encode("Once upon a time") == [1] + processor.encode("Once upon a time")


def test_sentencepiece_decode(sentencepiece_pair):
    processor, ours = sentencepiece_pair
    collapses = processor.normalize("a  a") == "\u2581a\u2581a"  # remove_extra_whitespaces (tok512)
    for s in SPECIAL_FREE:
        ids = processor.encode(s)
        text, text_streamed = ours.decode(ids), streamed(ours, [1] + ids)
        assert text == text_streamed
        if collapses and text.startswith("  "):
            # such a model's decoder drops every leading space; ours one, as run.c does
            text = text.lstrip(" ")
        assert text == processor.decode(ids), s
        if processor.decode(ids) == s:
            assert ours.decode(ours.encode(s)) == s


def test_sentencepiece_special_tokens_in_text(sentencepiece_pair):
    processor, ours = sentencepiece_pair
    ids = ours.encode("<s>Hello</s>", bos=False)
    assert ids[0] == processor.bos_id() and ids[-1] == processor.eos_id()
    assert ours.decode(ids) == "Hello"
    assert ours.stop_ids == (processor.eos_id(),)


# ---------------------------------------------------------------------------------------------
# byte-level BPE (GGUF model 'gpt2', tokenizer.json) against the tokenizers library


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
        "text<|im_end|>more", "<|endoftext|>", "a <|im_start|> b"]


# Llama 3's tokenizer.json pre_tokenizer, as Meta's file spells it
LLAMA3_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                           "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                           "\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def train_byte_level(folder: Path, digits: bool, llama3: bool = False) -> Path:
    """A small byte-level BPE trained here (no download) and saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if digits else byte_level)
    if llama3:
        document = json.loads(tokenizer.to_str())
        document["pre_tokenizer"] = LLAMA3_PRE_TOKENIZER
        tokenizer = Tokenizer.from_str(json.dumps(document))
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [Path(__file__).resolve().parents[1].joinpath("README.md").read_text()] + STRINGS
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module", params=["gpt2", "smollm", "llama-bpe"])
def byte_level_trio(request, tmp_path_factory):
    path = train_byte_level(tmp_path_factory.mktemp(request.param), digits=request.param == "smollm",
                            llama3=request.param == "llama-bpe")
    oracle = tokenizers.Tokenizer.from_file(str(path))
    meta = as_meta(tokenizer_json_metadata(json.loads(path.read_text()), request.param))
    meta["tokenizer.ggml.eos_token_id"] = oracle.token_to_id("<|endoftext|>")
    meta["tokenizer.ggml.bos_token_id"] = oracle.token_to_id("<|endoftext|>")
    return oracle, gguf_tokenizer(meta, "test.gguf"), load_hf_tokenizer(path.parent)


def test_byte_level_ids_equal(byte_level_trio):
    oracle, from_gguf, from_folder = byte_level_trio
    for ours in (from_gguf, from_folder):
        assert ours.kind == BYTE_LEVEL and not ours.add_bos
        mismatches = [s for s in STRINGS + CHAT if ours.encode(s) != oracle.encode(s).ids]
        assert not mismatches, mismatches[:3]


def test_byte_level_special_tokens_and_decode(byte_level_trio):
    oracle, from_gguf, from_folder = byte_level_trio
    im_start, im_end = oracle.token_to_id("<|im_start|>"), oracle.token_to_id("<|im_end|>")
    for ours in (from_gguf, from_folder):
        ids = ours.encode(CHAT[0])
        assert ids[0] == im_start and ids.count(im_end) == 2
        assert im_end in ours.stop_ids and ours.eos_id in ours.stop_ids
        for s in STRINGS + CHAT[:2]:
            ids = ours.encode(s)
            assert ours.decode(ids) == s == oracle.decode(ids, skip_special_tokens=False)
            assert streamed(ours, ids) == s
    assert from_folder.chat_template.startswith("{% for m in messages %}")


def test_digits_are_split_only_by_smollm(byte_level_trio):
    oracle, from_gguf, _ = byte_level_trio
    digits = len(from_gguf.encode("12345678901234567890"))
    assert digits == len(oracle.encode("12345678901234567890").ids)


def test_unsupported_tokenizer_metadata():
    with pytest.raises(FormatError, match="tokenizer.ggml.model 'bert'"):
        gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
    with pytest.raises(FormatError, match="tokenizer.ggml.pre 'qwen2'"):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "qwen2"}, "x.gguf")
    with pytest.raises(FormatError, match="no tokenizer"):
        gguf_tokenizer({}, "x.gguf")


# ---------------------------------------------------------------------------------------------
# SentencePiece-style tokenizer.json (as transformers writes it) against the tokenizers library

TOK512_JSON = Path(__file__).parent / "fixtures" / "hf_tokenizers" / "tok512"


def test_sentencepiece_style_tokenizer_json():
    oracle = tokenizers.Tokenizer.from_file(str(TOK512_JSON / "tokenizer.json"))
    ours = load_hf_tokenizer(TOK512_JSON)
    assert (ours.kind, ours.strips_first_space, ours.add_bos) == (SENTENCEPIECE_BPE, True, True)
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (1, 2, (2,))
    assert ours.encode("Once upon a time") == [1, 403, 407, 261, 378]  # REFERENCE.md's PROMPT_IDS
    for s in STRINGS + ["<s>Hello</s>", "a </s> b"]:
        ids = ours.encode(s, bos=False)
        assert ids == oracle.encode(s, add_special_tokens=False).ids, s
        assert ours.decode([1] + ids) == streamed(ours, [1] + ids) == oracle.decode(ids, skip_special_tokens=True), s
    assert ours.encode("<s>Hello</s>", bos=False)[::len(ours.encode("<s>Hello</s>", bos=False)) - 1] == [1, 2]


def test_gguf_sentencepiece_equals_transformers_tokenizer_json_without_extra_spaces():
    """tok512 was trained with remove_extra_whitespaces, which transformers' tokenizer.json drops;
    on text without leading, trailing or repeated spaces (a literal "▁" is a space) both must agree."""
    path = SENTENCEPIECE_MODELS["tok512"]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    oracle = tokenizers.Tokenizer.from_file(str(TOK512_JSON / "tokenizer.json"))
    ours = gguf_tokenizer(as_meta(sentencepiece_metadata(path)), str(path))
    plain = [s for s in SPECIAL_FREE if s and s.strip(" ") == s and "  " not in s and "\u2581" not in s]
    assert len(plain) > 150
    mismatches = [s for s in plain if ours.encode(s, bos=False) != oracle.encode(s, add_special_tokens=False).ids]
    assert not mismatches, mismatches[:3]
