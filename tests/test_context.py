"""A context longer than memory (issue 12.7): a v1 header whose seq_len is 2^30 is refused in one
line saying what it needs and what fits, in-process and with --workers 2, before any worker starts;
`--context N` runs such a model (or any) with a shorter context."""

import struct

import pytest

from cli_runner import run_llmtp

PROMPT = "Once upon a time"
SEQ_LEN_OFFSET = 32  # v1 header: magic, version, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size


@pytest.fixture(scope="module")
def huge_context(stories260k, tmp_path_factory):
    """stories260K as a v1 file whose header claims 2^30 positions (the file's size does not change)."""
    path = tmp_path_factory.mktemp("huge") / "huge-context.bin"
    converted = run_llmtp("convert", stories260k["model"], path, "--version", 1)
    assert converted.returncode == 0, converted.stderr
    with open(path, "r+b") as file:
        file.seek(SEQ_LEN_OFFSET)
        assert struct.unpack("<i", file.read(4)) == (512,)
        file.seek(SEQ_LEN_OFFSET)
        file.write(struct.pack("<i", 2 ** 30))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_context_that_cannot_fit_is_one_line_exit_2(huge_context, stories260k, workers, tmp_path):
    result = run_llmtp("generate", huge_context, "-z", stories260k["tokenizer"], "-n", 10, "-w", workers,
                       env_extra={"TMPDIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    message = lines[0]
    assert str(huge_context) in message and "1073741824 positions" in message and "GiB" in message, message
    assert "--context" in message and "CURVE" not in message, message
    assert list(tmp_path.iterdir()) == []  # refused before any worker was started


@pytest.mark.parametrize("workers", [0, 2])
def test_context_runs_a_shorter_context(huge_context, stories260k, workers):
    expected = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 60,
                         "-i", PROMPT)
    assert expected.returncode == 0, expected.stderr
    result = run_llmtp("generate", huge_context, "-z", stories260k["tokenizer"], "-t", 0, "-n", 60, "-i", PROMPT,
                       "--context", 64, "-w", workers)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.stdout


def test_steps_are_clamped_to_the_shorter_context(stories260k):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 100,
                       "-i", PROMPT, "--context", 32)
    assert result.returncode == 0, result.stderr
    assert "clamped to seq_len 32" in result.stderr


@pytest.mark.parametrize("value", [0, 513, -1, "x"])
def test_a_context_outside_the_model_is_one_line(stories260k, value):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-n", 4, "--context", value)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--context" in result.stderr, result.stderr


def test_context_does_not_apply_to_running_workers(tmp_path):
    result = run_llmtp("generate", "--cluster", tmp_path / "cluster.json", "--context", 16)
    assert result.returncode == 2, result.stderr
    assert "--context" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_serve_and_chat_take_context(command):
    result = run_llmtp(command, "--help")
    if result.returncode != 0 and "invalid choice" in result.stderr:
        pytest.skip(f"no `llmtp {command}` command on this branch")
    assert "--context" in result.stdout
