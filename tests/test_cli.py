"""`llmtp` as a user runs it: whole runs pinned to llama2.c's REFERENCE.md, and bad input
answered with one line, exit 2 and no traceback."""

import re
import struct

import pytest
import sentencepiece as spm

from cli_runner import run_llmtp


def reference_case(stories260k, case):
    section = stories260k["reference"].read_text().split(f"## {case}")[1]
    stdout = re.search(r"stdout:\n```\n(.*?)```", section, re.S).group(1)
    prompt_ids = re.search(r"PROMPT_IDS: `([^`]*)`", section).group(1)
    return stdout, prompt_ids


@pytest.fixture(scope="module")
def converted(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    for version in (1, 2):
        result = run_llmtp("convert", stories260k["model"], folder / f"v{version}.bin", "--version", version)
        assert result.returncode == 0, result.stderr
    return {0: stories260k["model"], 1: folder / "v1.bin", 2: folder / "v2.bin"}


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_greedy_prints_reference_text(stories260k, converted, version, workers):
    expected, _ = reference_case(stories260k, "s260_once_t0_n64")
    result = run_llmtp("generate", converted[version], "-z", stories260k["tokenizer"], "-t", 0, "-n", 64,
                       "-i", "Once upon a time", "--workers", workers)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert "tok/s" in result.stderr


@pytest.mark.parametrize("case, args", [
    ("s260_noprompt_t0_n256", ["-t", "0", "-n", "256"]),
    ("s260_t1_p09_s133742", ["-t", "1.0", "-p", "0.9", "-s", "133742", "-n", "256"]),
])
def test_runs_without_prompt_match_reference(stories260k, converted, case, args):
    expected, _ = reference_case(stories260k, case)
    for version in (0, 1):
        result = run_llmtp("generate", converted[version], "-z", stories260k["tokenizer"], *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


def test_sentencepiece_model_works_as_tokenizer(stories260k):
    expected, _ = reference_case(stories260k, "s260_once_t0_n64")
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["sp_model"], "-t", 0, "-n", 64,
                       "-i", "Once upon a time")
    assert result.stdout == expected


def test_tokenize_prints_reference_prompt_ids(stories260k):
    _, prompt_ids = reference_case(stories260k, "s260_once_t0_n64")
    result = run_llmtp("tokenize", "-z", stories260k["tokenizer"], "-i", "Once upon a time")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == prompt_ids
    text = "Hello,   world!\n\tÇa va? Привет 你好 🙂"
    processor = spm.SentencePieceProcessor(model_file=str(stories260k["sp_model"]))
    result = run_llmtp("tokenize", "-z", stories260k["tokenizer"], "-i", text)
    assert result.stdout.split() == [str(t) for t in [1] + processor.encode(text)]


def test_inspect_describes_the_model(stories260k):
    result = run_llmtp("inspect", stories260k["model"])
    assert result.returncode == 0, result.stderr
    for fragment in ("version 0", "172", "512"):
        assert fragment in result.stdout


def test_steps_beyond_context_are_clamped_with_a_notice(stories260k):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 100000,
                       "-i", "Once")
    assert result.returncode == 0, result.stderr
    assert "clamped to seq_len 512" in result.stderr


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_truncated_checkpoint(stories260k, tmp_path):
    broken = tmp_path / "truncated.bin"
    broken.write_bytes(stories260k["model"].read_bytes()[:50000])
    result = run_llmtp("generate", broken, "-z", stories260k["tokenizer"], "-n", 8)
    assert_one_line_error(result, "truncated.bin", "truncated")


def test_wrong_magic(stories260k, tmp_path):
    broken = tmp_path / "magic.bin"
    broken.write_bytes(struct.pack("<I", 0x12345678) + bytes(300))
    assert_one_line_error(run_llmtp("inspect", broken), "magic.bin", "magic")


def test_unknown_version(tmp_path):
    broken = tmp_path / "version.bin"
    broken.write_bytes(struct.pack("<Ii", 0x616B3432, 9) + bytes(248))
    assert_one_line_error(run_llmtp("inspect", broken), "version.bin", "version")


def first_tokens_of_tokenizer_bin(data: bytes, n_tokens: int) -> bytes:
    """The header and the first n_tokens entries of a llama2.c tokenizer.bin, parsed here by hand."""
    offset = 4
    for _ in range(n_tokens):
        (length,) = struct.unpack_from("<i", data, offset + 4)
        offset += 8 + length
    return data[:offset]


def test_tokenizer_smaller_than_vocabulary(stories260k, tmp_path):
    small = tmp_path / "small_tok.bin"
    small.write_bytes(first_tokens_of_tokenizer_bin(stories260k["tokenizer"].read_bytes(), 300))
    result = run_llmtp("generate", stories260k["model"], "-z", small, "-n", 8)
    assert_one_line_error(result, "small_tok.bin", "300", "512")


def test_tokenizer_cut_mid_token(stories260k, tmp_path):
    cut = tmp_path / "cut_tok.bin"
    cut.write_bytes(stories260k["tokenizer"].read_bytes()[:2001])
    result = run_llmtp("generate", stories260k["model"], "-z", cut, "-n", 8)
    assert_one_line_error(result, "cut_tok.bin", "truncated")


def test_prompt_longer_than_context(stories260k):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-i", "word " * 600)
    assert_one_line_error(result, "context")


def test_bad_group_size_is_refused(stories260k, tmp_path):
    result = run_llmtp("convert", stories260k["model"], tmp_path / "x.bin", "--version", 2, "--group-size", 64)
    assert_one_line_error(result, "64")


def test_missing_checkpoint(stories260k, tmp_path):
    result = run_llmtp("generate", tmp_path / "nope.bin", "-z", stories260k["tokenizer"])
    assert_one_line_error(result, "nope.bin")
