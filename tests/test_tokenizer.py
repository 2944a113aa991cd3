"""Tokenizer: ids against SentencePiece (the oracle) for llama2.c's tok512 and Llama 2's 32k
vocabulary, through both tokenizer.bin and .model; decoding, streaming, and malformed files."""

import random
import re
import shutil
import struct
import time
from pathlib import Path

import pytest

from llmtp.common.errors import FormatError
from llmtp.common.formats.tokenizer import load_tokenizer

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
TOKENIZERS = {"tok512": "stories260K/tok512", "llama2": "llama2-tokenizer/tokenizer"}
VOCAB_SIZES = {"tok512": 512, "llama2": 32000}
BOS, EOS = 1, 2

HANDWRITTEN = [
    "",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "Hello, world! How's it going? (Fine.) [ok] {yes} <no> \"quoted\" 'single' ~`@#$%^&*_+-=|\\/;:",
    "a  b   c    d", " leading", "  two leading", "trailing ", "trailing two  ", " ", "   ", "\u2581",
    "line one\nline two\n\nline four\r\nwindows", "\ttab\tseparated\t", " \n \t ", "\n",
    "café naïve résumé Zürich façade São Paulo", "e\u0301 combining acute", "ÀÉÎÕÜ ß æøå",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "你好，世界。我喜欢吃苹果。日本語のテキストです。한국어 텍스트",
    "emoji 😀👍🏽 family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag 🇫🇷 heart ❤️ keycap 1️⃣",
    "0 7 42 1234567890 3.14159 -273.15 1,000,000 2024-01-31 0x1F",
    "<s> </s> <unk> <0x0A> <0xFF> <pad> [INST] <<SYS>>",
    "literal\u2581space\u2581symbol", "\u2581leading symbol", "mixed \u2581 \u2581\u2581 spaces",
    "nul\x00byte and \x07 bell \x1b[0m escape", "\u3000ideographic\u00a0no-break\u2009thin spaces",
    "עברית العربية हिन्दी ไทย Ελληνικά", "\U0001d54f\U0001d586 math \U000e0041 tag \uFFFD\uFEFF",
    "private use \ue000\U000f0000 and noncharacters \ufdd0\uffff",
]

CHAR_RANGES = [(0x20, 0x7F), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x30000),
               (0xE0000, 0xE0080), (0x00, 0x20)]


def random_strings(seed: int, count: int, max_length: int) -> list[str]:
    """Seeded strings of mostly ASCII with spaces, newlines and codepoints from all planes."""
    rng = random.Random(seed)

    def random_char() -> str:
        draw = rng.random()
        if draw < 0.4:
            return chr(rng.randrange(0x20, 0x7F))
        if draw < 0.5:
            return rng.choice([" ", " ", " ", "\n", "\t"])
        low, high = rng.choice(CHAR_RANGES)
        return chr(rng.randrange(low, high))

    return ["".join(random_char() for _ in range(rng.randint(0, max_length))) for _ in range(count)]


TEST_STRINGS = HANDWRITTEN + random_strings(seed=1234, count=600, max_length=60)
# SentencePiece reads a literal U+2581 as a space, so such text cannot come back unchanged.
DECODABLE_STRINGS = [text for text in TEST_STRINGS if "\u2581" not in text]


def model_path(name: str, extension: str) -> Path:
    path = MODELS / f"{TOKENIZERS[name]}.{extension}"
    if not path.exists():
        pytest.skip(f"test tokenizer {path} is absent (../shared/models is not beside the repo)")
    return path


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def oracle(name):
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path(name, "model")))


@pytest.fixture(scope="module", params=["bin", "model"])
def tokenizer(request, name):
    return load_tokenizer(model_path(name, request.param), VOCAB_SIZES[name])


def first_mismatches(pairs, limit: int = 3) -> list:
    return [(text, got, expected) for text, got, expected in pairs if got != expected][:limit]


# --- encoding against SentencePiece -------------------------------------------------------


def test_encode_matches_sentencepiece(tokenizer, oracle):
    pairs = [(text, tokenizer.encode(text), [BOS] + oracle.encode(text)) for text in TEST_STRINGS]
    assert first_mismatches(pairs) == []


def test_encode_without_bos_with_eos_matches_sentencepiece(tokenizer, oracle):
    pairs = [(text, tokenizer.encode(text, bos=False, eos=True), oracle.encode(text) + [EOS])
             for text in HANDWRITTEN]
    assert first_mismatches(pairs) == []


def test_encode_more_random_strings_matches_sentencepiece(name, oracle):
    tokenizer = load_tokenizer(model_path(name, "bin"), VOCAB_SIZES[name])
    texts = random_strings(seed=99, count=1500, max_length=40)
    pairs = [(text, tokenizer.encode(text), [BOS] + oracle.encode(text)) for text in texts]
    assert first_mismatches(pairs) == []


def test_encode_10kb_is_fast_and_matches(tokenizer, oracle):
    text = "\n".join(TEST_STRINGS)[:10_000]
    started = time.perf_counter()
    ids = tokenizer.encode(text)
    elapsed = time.perf_counter() - started
    assert ids == [BOS] + oracle.encode(text)
    assert elapsed < 1.0, f"encoding 10 KB took {elapsed:.2f} s"


def test_bin_and_model_give_the_same_vocabulary(name):
    from_bin = load_tokenizer(model_path(name, "bin"))
    from_model = load_tokenizer(model_path(name, "model"))
    assert from_bin.vocab_size == from_model.vocab_size == VOCAB_SIZES[name]
    assert from_bin.pieces == from_model.pieces
    assert from_bin.scores == from_model.scores
    assert from_bin.remove_extra_whitespaces == from_model.remove_extra_whitespaces


def test_pieces_use_spaces_like_tokenizer_bin(name, oracle):
    tokenizer = load_tokenizer(model_path(name, "model"))
    the = oracle.piece_to_id("\u2581the")
    assert tokenizer.pieces[the] == " the"


# --- decoding -----------------------------------------------------------------------------


def test_decode_matches_sentencepiece(tokenizer, oracle):
    pairs = [(text, tokenizer.decode(tokenizer.encode(text)), oracle.decode(oracle.encode(text)))
             for text in DECODABLE_STRINGS]
    assert first_mismatches(pairs) == []


def test_round_trip(tokenizer):
    texts = DECODABLE_STRINGS
    if tokenizer.remove_extra_whitespaces:  # tok512 was trained on text with single spaces only
        texts = [text for text in texts if not re.search(r"^ | $|  ", text)]
    pairs = [(text, tokenizer.decode(tokenizer.encode(text)), text) for text in texts]
    assert len(texts) > 300
    assert first_mismatches(pairs) == []


def test_decode_random_ids_matches_sentencepiece(tokenizer, oracle):
    # Mostly byte pieces, so that invalid and split UTF-8 is common. The first piece is not all
    # spaces: SentencePiece then strips more than run.c's one space after BOS (see README).
    rng = random.Random(7)
    sequences = []
    while len(sequences) < 1000:
        body = [rng.randrange(3, 259 if rng.random() < 0.7 else tokenizer.vocab_size)
                for _ in range(rng.randint(1, 12))]
        if tokenizer.pieces[body[0]].strip(" "):
            sequences.append([BOS] + body)
    pairs = [(ids, tokenizer.decode(ids), oracle.decode(ids)) for ids in sequences]
    assert first_mismatches(pairs) == []


def test_bos_and_eos_decode_to_nothing(tokenizer, oracle):
    hello = tokenizer.encode("hello", bos=False)
    assert tokenizer.decode([BOS, EOS]) == ""
    assert tokenizer.decode([BOS] + hello + [EOS]) == "hello"
    assert tokenizer.decode(hello + [EOS, EOS]) == " hello"  # no BOS: the space stays (run.c)


def test_only_the_piece_right_after_bos_loses_its_space(tokenizer, oracle):
    the = oracle.piece_to_id("\u2581the")
    assert tokenizer.decode([BOS, the, the]) == "the the"
    assert tokenizer.decode([the, the]) == " the the"
    assert tokenizer.decode([BOS, 3 + 0x20, the]) == "  the"  # a byte piece keeps its space


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError):
        tokenizer.decode([BOS, tokenizer.vocab_size])
    with pytest.raises(ValueError):
        tokenizer.decode([-1])


# --- streaming decoder --------------------------------------------------------------------


def stream(tokenizer, ids) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_streaming_equals_batch_decode(tokenizer):
    rng = random.Random(11)
    sequences = [tokenizer.encode(text) for text in TEST_STRINGS]
    sequences += [[rng.randrange(tokenizer.vocab_size) if rng.random() < 0.3 else rng.randrange(259)
                   for _ in range(rng.randint(0, 20))] for _ in range(300)]
    pairs = [(ids, "".join(stream(tokenizer, ids)), tokenizer.decode(ids)) for ids in sequences]
    assert first_mismatches(pairs) == []


def test_stream_holds_an_emoji_split_over_byte_pieces(oracle, name):
    tokenizer = load_tokenizer(model_path(name, "bin"), VOCAB_SIZES[name])
    space = oracle.piece_to_id("\u2581")
    smile_bytes = [3 + byte for byte in "😀".encode("utf-8")]  # not in either vocabulary as a piece
    assert tokenizer.encode("😀") == [BOS, space] + smile_bytes
    assert stream(tokenizer, [BOS, space] + smile_bytes + [EOS]) == ["", "", "", "", "", "😀", "", ""]


def test_stream_replaces_invalid_bytes_like_sentencepiece(tokenizer, oracle):
    a = oracle.piece_to_id("a")
    cut_emoji = [3 + 0xF0, 3 + 0x9F]
    # An unfinished sequence is held until flush, then becomes one U+FFFD per byte.
    assert stream(tokenizer, [BOS, a] + cut_emoji) == ["", "a", "", "", "\ufffd\ufffd"]
    assert oracle.decode([a] + cut_emoji) == "a\ufffd\ufffd"
    # A piece that cannot continue it settles it at once.
    assert stream(tokenizer, [BOS, a] + cut_emoji + [a]) == ["", "a", "", "", "\ufffd\ufffda", ""]
    assert stream(tokenizer, [BOS, 3 + 0x80, a]) == ["", "\ufffd", "a", ""]
    assert oracle.decode([3 + 0x80, a]) == "\ufffda"


# --- BPE details on a hand-made vocabulary (no shared files needed) -----------------------


def byte_pieces() -> list[tuple[str, float]]:
    return [(f"<0x{byte:02X}>", 0.0) for byte in range(256)]


def write_bin(path: Path, pieces: list[tuple[str, float]], max_token_length: int | None = None) -> Path:
    encoded = [(piece.encode("utf-8"), score) for piece, score in pieces]
    if max_token_length is None:
        max_token_length = max(len(piece) for piece, _ in encoded)
    with path.open("wb") as file:
        file.write(struct.pack("<I", max_token_length))
        for piece, score in encoded:
            file.write(struct.pack("<fi", score, len(piece)) + piece)
    return path


def tiny_tokenizer(tmp_path, normal_pieces: list[tuple[str, float]]):
    specials = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
    path = write_bin(tmp_path / "tiny.bin", specials + byte_pieces() + normal_pieces)
    return load_tokenizer(path), {piece: 259 + index for index, (piece, _) in enumerate(normal_pieces)}


def test_highest_score_merges_first_and_ties_go_left(tmp_path):
    tokenizer, ids = tiny_tokenizer(tmp_path, [(" ", 0.0), ("a", 0.0), ("b", 0.0), ("c", 0.0),
                                               ("ab", -5.0), ("bc", -1.0), ("aa", -2.0)])
    assert tokenizer.encode("abc") == [BOS, ids[" "], ids["a"], ids["bc"]]
    assert tokenizer.encode("aaa") == [BOS, ids[" "], ids["aa"], ids["a"]]
    assert tokenizer.encode("aaaa") == [BOS, ids[" "], ids["aa"], ids["aa"]]


def test_control_pieces_are_never_matched_from_text(tmp_path):
    # run.c would merge "\n<s>" + "\n" into BOS, whose piece in tokenizer.bin is "\n<s>\n".
    tokenizer, ids = tiny_tokenizer(tmp_path, [(" ", 0.0), ("\n", 0.0), ("<", 0.0), ("s", 0.0), (">", 0.0),
                                               ("\n<", -1.0), ("\n<s", -2.0), ("\n<s>", -3.0)])
    assert tokenizer.encode("\n<s>\n", bos=False) == [ids[" "], ids["\n<s>"], ids["\n"]]


def test_unknown_characters_fall_back_to_byte_pieces(tmp_path):
    tokenizer, ids = tiny_tokenizer(tmp_path, [(" ", 0.0), ("a", 0.0)])
    assert tokenizer.encode("aé", bos=False) == [ids[" "], ids["a"], 3 + 0xC3, 3 + 0xA9]
    assert tokenizer.decode(tokenizer.encode("aé")) == "aé"


def test_undecodable_argument_bytes_become_byte_pieces(tmp_path):
    # sys.argv carries invalid UTF-8 as surrogateescape codepoints U+DC80..U+DCFF.
    tokenizer, ids = tiny_tokenizer(tmp_path, [(" ", 0.0), ("a", 0.0)])
    text = b"a\xff".decode("utf-8", errors="surrogateescape")
    assert tokenizer.encode(text, bos=False) == [ids[" "], ids["a"], 3 + 0xFF]


def test_whitespace_setting_of_a_bin_is_guessed_and_can_be_overridden(tmp_path, name, oracle):
    # Only Llama 2 has pieces of repeated spaces; its normalizer keeps extra spaces.
    path = model_path(name, "bin")
    assert load_tokenizer(path).remove_extra_whitespaces == (name == "tok512")
    keeping = load_tokenizer(path, remove_extra_whitespaces=False)
    assert keeping.decode(keeping.encode("  a  b ")) == "  a  b "


# --- loading and malformed files ----------------------------------------------------------


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_bin_larger_than_the_vocabulary_is_cut(name):
    tokenizer = load_tokenizer(model_path(name, "bin"), vocab_size=300)
    assert tokenizer.vocab_size == 300
    assert all(token_id < 300 for token_id in tokenizer.encode("Once upon a time"))


def test_model_larger_than_the_vocabulary_is_cut(name):
    assert load_tokenizer(model_path(name, "model"), vocab_size=300).vocab_size == 300


def test_format_is_detected_by_content(tmp_path, name):
    disguised_model = shutil.copyfile(model_path(name, "model"), tmp_path / "tokenizer.bin")
    disguised_bin = shutil.copyfile(model_path(name, "bin"), tmp_path / "tokenizer.data")
    assert load_tokenizer(disguised_model).pieces == load_tokenizer(disguised_bin).pieces


@pytest.mark.parametrize("extension", ["bin", "model"])
def test_tokenizer_smaller_than_the_vocabulary(extension):
    path = model_path("tok512", extension)
    with pytest.raises(FormatError) as error:
        load_tokenizer(path, vocab_size=1000)
    assert_one_line_naming(error, path, "has 512 tokens", "needs 1000")


def bin_prefix(tmp_path: Path, n_tokens: int, extra_bytes: int = 0) -> Path:
    """The first n_tokens of tok512.bin (plus a few bytes of the next), in tmp_path."""
    data = model_path("tok512", "bin").read_bytes()
    offset = 4
    for _ in range(n_tokens):
        offset += 8 + struct.unpack_from("<i", data, offset + 4)[0]
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:offset + extra_bytes])
    return path


def test_bin_ending_between_tokens(tmp_path):
    path = bin_prefix(tmp_path, 300)
    with pytest.raises(FormatError) as error:
        load_tokenizer(path, vocab_size=512)
    assert_one_line_naming(error, path, "has 300 tokens", "needs 512")


@pytest.mark.parametrize("extra_bytes", [3, 10])  # inside the score/length, inside the piece
@pytest.mark.parametrize("vocab_size", [512, None])
def test_truncated_bin(tmp_path, extra_bytes, vocab_size):
    path = bin_prefix(tmp_path, 300, extra_bytes)
    with pytest.raises(FormatError) as error:
        load_tokenizer(path, vocab_size)
    assert_one_line_naming(error, path, "truncated", "token 300")


def test_bin_shorter_than_its_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\x07\x00")
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "2 bytes")


def test_token_longer_than_max_token_length(tmp_path):
    pieces = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)] + byte_pieces() + [(" hello", 0.0)]
    path = write_bin(tmp_path / "lying.bin", pieces, max_token_length=5)
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "token 2 is 6 bytes", "0..5", "max_token_length")


def test_bin_without_byte_pieces(tmp_path):
    path = write_bin(tmp_path / "no_bytes.bin", [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0), (" ", 0.0)])
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "<0x00>")


def test_bin_with_invalid_utf8_piece(tmp_path):
    path = tmp_path / "bad_utf8.bin"
    path.write_bytes(struct.pack("<I", 2) + struct.pack("<fi", 0.0, 2) + b"\xff\xfe")
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "token 0", "UTF-8")


def test_bin_names_the_first_piece_that_is_not_utf8(tmp_path):
    good = [(f"piece{i}".encode(), 0.0) for i in range(7)]
    pieces = good[:5] + [(b"ok\xc3", 0.0)] + good[5:]  # a two-byte sequence cut after its lead byte
    path = tmp_path / "bad_utf8_later.bin"
    path.write_bytes(struct.pack("<I", 8) + b"".join(struct.pack("<fi", score, len(piece)) + piece
                                                     for piece, score in pieces))
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "token 5 ", "UTF-8")


def test_a_repeated_piece_encodes_as_its_first_id(tmp_path):
    # SentencePiece matches the first id of a piece that appears twice; the later one only decodes
    pieces = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)] + byte_pieces() + \
        [(" a", -1.0), ("b", -2.0), (" a", 5.0), ("b", 0.0)]
    tokenizer = load_tokenizer(write_bin(tmp_path / "repeats.bin", pieces))
    first_a, first_b, second_a, second_b = range(3 + 256, 3 + 256 + 4)
    assert tokenizer.encode("a", bos=False) == [first_a]
    assert tokenizer.encode("a b", bos=False) == [first_a, 3 + ord(" "), first_b]  # " b" is no piece
    assert tokenizer.decode([second_a, second_b]) == " ab"
    assert tokenizer.decode([first_b]) == "b"


def test_garbage_model(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(random.Random(3).randbytes(2000))
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path, "SentencePiece")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.bin"
    with pytest.raises(FormatError) as error:
        load_tokenizer(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("extension", ["bin", "model"])
def test_another_models_longer_tokenizer_is_refused_unless_allowed(extension):
    path = model_path("llama2", extension)  # 32,000 pieces, for a 512-token model
    with pytest.raises(FormatError) as error:
        load_tokenizer(path, vocab_size=512, allow_longer=False)
    assert_one_line_naming(error, path, "512", "another model's tokenizer", "--any-tokenizer")
    assert load_tokenizer(path, vocab_size=512, allow_longer=True).vocab_size == 512
