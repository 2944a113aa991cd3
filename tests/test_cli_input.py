"""The CLI's small things (issue 13.3, 13.7, 13.9, 12.8, 13.2): bad flags and flag combinations
in one line with exit 2, the prompt from stdin or a file, tokenizers of another model, and
outputs that never replace their input nor appear half written."""

import hashlib
import os
import random
import signal
import subprocess
import time

import pytest

from cli_runner import llmtp_command, run_llmtp
from conftest import SHARED_MODELS
from model_factory import make_config, write_random_checkpoint
from test_cli import assert_one_line_error, reference_case

LLAMA2_TOKENIZER = SHARED_MODELS / "llama2-tokenizer" / "tokenizer.bin"


# --- argparse and argument values -------------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["generate", "--no-such-flag"], ["--no-such-flag", "llmtp generate --help"]),
    (["gen"], ["invalid choice", "llmtp --help"]),
    (["convert", "only-one.bin"], ["required", "llmtp convert --help"]),
    (["generate", "-n", "-5"], ["-n/--steps", "-5"]),
    (["generate", "-t", "nan"], ["-t/--temperature", "nan"]),
    (["generate", "-t", "inf"], ["-t/--temperature", "inf"]),
    (["generate", "-p", "nan"], ["-p/--topp", "nan"]),
    (["generate", "--timeout", "nan"], ["--timeout", "nan"]),
    (["generate", "--timeout", "inf"], ["--timeout", "inf"]),
    (["generate", "--timeout", "-1"], ["--timeout", "-1"]),
    (["generate", "--timeout", "0"], ["--timeout", "0"]),
    (["generate", "--recover-wait", "nan"], ["--recover-wait", "nan"]),
    (["generate", "-s", str(2**64)], ["-s/--seed", str(2**64), "2**64"]),
    (["generate", "-s", "-1"], ["-s/--seed", "-1"]),
    (["generate", "-k", "-2"], ["-k/--top-k", "-2"]),
    (["generate", "-w", "-1"], ["-w/--workers", "-1"]),
    (["generate", "-i", "x", "-f", "prompt.txt"], ["-f/--prompt-file", "-i/--prompt"]),
])
def test_bad_arguments_are_one_line(args, fragments):
    assert_one_line_error(run_llmtp(*args), *fragments)


def test_largest_seed_is_accepted(stories260k):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-n", 8,
                       "-s", 2**64 - 1)
    assert result.returncode == 0, result.stderr


# --- the prompt from stdin or a file ----------------------------------------------------------

def test_prompt_from_stdin_and_from_file_match_dash_i(stories260k, tmp_path):
    expected, _ = reference_case(stories260k, "s260_once_t0_n64")
    common = ["generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 64]
    from_stdin = run_llmtp(*common, "-i", "-", input="Once upon a time\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == expected
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time\n")
    from_file = run_llmtp(*common, "-f", prompt_file)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == expected


def test_unreadable_prompt_file_is_one_line(stories260k, tmp_path):
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-f", tmp_path / "nope.txt")
    assert_one_line_error(result, "nope.txt", "prompt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"Once \xff\xfe")
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-f", binary)
    assert_one_line_error(result, "binary.txt", "UTF-8")


# --- the model before the tokenizer, and flags that cannot both apply --------------------------

def test_mistyped_model_path_is_reported_as_the_model(tmp_path):
    result = run_llmtp("generate", tmp_path / "nope" / "model.bin")
    assert_one_line_error(result, "model.bin", "checkpoint")
    assert "tokenizer" not in result.stderr


def test_cluster_given_a_model_path_says_so(stories260k):
    result = run_llmtp("generate", "--cluster", stories260k["model"], "-n", 8)
    assert_one_line_error(result, "stories260K.bin", "checkpoint, not a cluster state file")


def test_cluster_with_workers_is_refused(tmp_path):
    result = run_llmtp("generate", "--cluster", tmp_path / "cluster.json", "--workers", 3)
    assert_one_line_error(result, "--cluster", "--workers")


def test_cluster_with_a_checkpoint_is_refused(stories260k, tmp_path):
    result = run_llmtp("generate", stories260k["model"], "--cluster", tmp_path / "cluster.json")
    assert_one_line_error(result, "--cluster", "CHECKPOINT")


def test_more_workers_than_cores_gets_a_notice(stories260k):
    one_core = next(iter(os.sched_getaffinity(0)))
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 8,
                       "-w", 2, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert result.returncode == 0, result.stderr
    assert "--workers 2 is more than the 1 usable core;" in result.stderr


# --- a tokenizer of another model -------------------------------------------------------------

def test_longer_tokenizer_is_refused_unless_any_tokenizer(stories260k):
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
    args = ["generate", stories260k["model"], "-z", LLAMA2_TOKENIZER, "-t", 0, "-n", 16]
    assert_one_line_error(run_llmtp(*args), "tokenizer.bin", "512", "--any-tokenizer")
    accepted = run_llmtp(*args, "--any-tokenizer")
    assert accepted.returncode == 0, accepted.stderr


# --- what inspect, shard and bench print ------------------------------------------------------

def test_inspect_says_one_query_head(tmp_path):
    config = make_config(n_heads=4, n_kv_heads=4, dim=32)
    result = run_llmtp("inspect", write_random_checkpoint(tmp_path / "mha.bin", config, seed=1))
    assert result.returncode == 0, result.stderr
    assert "(1 query head per kv head)" in result.stdout
    grouped = run_llmtp("inspect", write_random_checkpoint(tmp_path / "gqa.bin", make_config(), seed=1))
    assert "(3 query heads per kv head)" in grouped.stdout


def test_shard_ranges_include_their_ends(tmp_path):
    """Every a..b in shard's description includes b: the next shard starts at b + 1, the last ends at size - 1."""
    import re
    config = make_config()  # 6 heads, 2 kv heads, hidden 100, vocab 67
    checkpoint = write_random_checkpoint(tmp_path / "m.bin", config, seed=1)
    result = run_llmtp("shard", checkpoint, "-w", 2, "-o", tmp_path / "shards")
    assert result.returncode == 0, result.stderr
    sizes = {"heads": config.n_heads, "kv heads": config.n_kv_heads, "hidden": config.hidden_dim,
             "vocab": config.vocab_size}
    for name, size in sizes.items():
        ranges = [(int(a), int(b)) for a, b in re.findall(rf"(?<![a-z] ){name} (\d+)\.\.(\d+)", result.stdout)]
        assert len(ranges) == 2, (name, result.stdout)
        assert ranges[0][0] == 0 and ranges[1][0] == ranges[0][1] + 1 and ranges[1][1] == size - 1, (name, ranges)


def test_bench_prints_a_small_kernel_rate_as_a_number():
    from llmtp.coordinator.bench.report import format_rate
    assert format_rate(0.0042) == "0.0042" and format_rate(0.4) == "0.4" and format_rate(12.34) == "12.3"
    assert format_rate(1234.5) == "1234"


def test_bench_kernel_probe_measures_tiny_products():
    from llmtp.coordinator.bench.limits import measure_gemm_gflops
    assert measure_gemm_gflops(1, 8, 8, "numpy") > 0


# --- outputs: never onto the input, never half written ----------------------------------------

def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_onto_its_input_is_refused(stories260k, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(stories260k["model"].read_bytes())
    before = sha256(source)
    assert_one_line_error(run_llmtp("convert", source, source, "--version", 1), "model.bin", "the output is the input")
    linked = tmp_path / "hard-link.bin"
    os.link(source, linked)
    assert_one_line_error(run_llmtp("convert", source, linked, "--version", 1), "hard-link.bin", "same file")
    symlinked = tmp_path / "sym-link.bin"
    symlinked.symlink_to(source)
    assert_one_line_error(run_llmtp("convert", source, symlinked, "--version", 1), "sym-link.bin", "same file")
    assert sha256(source) == before


def test_convert_into_a_folder_or_proc_is_one_line(stories260k, tmp_path):
    assert_one_line_error(run_llmtp("convert", stories260k["model"], tmp_path, "--version", 1), "folder")
    assert_one_line_error(run_llmtp("convert", stories260k["model"], "/proc/x.bin", "--version", 1), "/proc/x.bin")


def test_convert_killed_mid_write_leaves_no_partial_file_under_the_output_name(tmp_path):
    """kill -9 at random moments: while it loads (after a random delay) and while it writes (once its
    temporary file appears, after a random delay). The output's name never holds a partial file."""
    from llmtp.common.formats.checkpoint import checkpoint_size, load_checkpoint
    config = make_config(dim=256, hidden_dim=768, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=8000, seq_len=64)
    source = write_random_checkpoint(tmp_path / "source.bin", config, seed=3)
    output = tmp_path / "converted.bin"
    rng = random.Random(13)
    killed_while_writing = 0
    for attempt in range(8):
        process = subprocess.Popen(llmtp_command() + ["convert", str(source), str(output), "--version", "2"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if attempt % 4 == 0:  # somewhere in start-up or loading
                time.sleep(rng.uniform(0, 0.4))
            else:  # once writing has begun
                deadline = time.monotonic() + 60
                while not any(tmp_path.glob("converted.bin?*")) and process.poll() is None:
                    assert time.monotonic() < deadline, "convert never started writing"
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.05))
            killed_while_writing += process.poll() is None and any(tmp_path.glob("converted.bin?*"))
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
        if output.exists():  # it finished before the kill: then it is whole
            assert output.stat().st_size == checkpoint_size(config, 2, load_checkpoint(output).group_size)
            output.unlink()
    assert killed_while_writing >= 1
    finished = run_llmtp("convert", source, output, "--version", 2)
    assert finished.returncode == 0, finished.stderr
    assert load_checkpoint(output).config == config


def test_shard_output_onto_a_file_or_existing_shards(tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / "m.bin", make_config(), seed=1)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert_one_line_error(run_llmtp("shard", checkpoint, "-w", 2, "-o", a_file), "a-file", "not a folder")
    assert a_file.read_text() == "keep me"
    shards = tmp_path / "shards"
    assert run_llmtp("shard", checkpoint, "-w", 2, "-o", shards).returncode == 0
    manifest = (shards / "manifest.json").read_text()
    assert_one_line_error(run_llmtp("shard", checkpoint, "-w", 2, "-o", shards), "shards", "--force")
    assert (shards / "manifest.json").read_text() == manifest
    forced = run_llmtp("shard", checkpoint, "-w", 2, "-o", shards, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not list(shards.glob("*.partial"))


def test_keygen_into_proc_or_onto_existing_keys_is_one_line(tmp_path):
    assert_one_line_error(run_llmtp("keygen", "-o", "/proc/x"), "/proc/x")
    keys = tmp_path / "keys"
    made = run_llmtp("keygen", "-o", keys)
    assert made.returncode == 0, made.stderr
    assert sorted(path.name for path in keys.iterdir()) == ["coordinator.key", "coordinator.key_secret",
                                                            "worker.key", "worker.key_secret"]
    assert (keys / "worker.key_secret").stat().st_mode & 0o777 == 0o600
    secret = (keys / "worker.key_secret").read_bytes()
    assert_one_line_error(run_llmtp("keygen", "-o", keys), "exists")
    assert (keys / "worker.key_secret").read_bytes() == secret
    assert sorted(path.name for path in keys.iterdir())[-1] == "worker.key_secret"  # no staging folder left
