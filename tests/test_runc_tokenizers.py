"""Tokenizers that run.c runs and llmtp used to refuse: a character-level tokenizer.bin with no
<0xXX> pieces. The oracle is run.c's own stdout (tests/fixtures/runc_charvocab.json, made by
tools/record_runc_fixtures.py from a run.c built outside the repository)."""

import hashlib
import json
from pathlib import Path

import pytest

import charvocab
from cli_runner import run_llmtp
from llmtp.common.formats.tokenizer import load_tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "runc_charvocab.json").read_text())


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    model, tokenizer = charvocab.write_char_model(tmp_path_factory.mktemp("charvocab"))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == FIXTURE["model_sha256"], "not the fixture's model"
    assert hashlib.sha256(tokenizer.read_bytes()).hexdigest() == FIXTURE["tokenizer_sha256"]
    return model, tokenizer


def test_a_character_outside_the_vocabulary_is_its_bytes_plus_three(char_model):
    tokenizer = load_tokenizer(char_model[1], charvocab.VOCAB_SIZE)
    assert tokenizer.encode("é", bos=False) == [3, 0xC3 + 3, 0xA9 + 3]  # the dummy-prefix space (a piece), then é
    assert tokenizer.encode("", bos=True) == [1]


def test_unk_prints_as_its_text(char_model):
    tokenizer = load_tokenizer(char_model[1], charvocab.VOCAB_SIZE)
    assert tokenizer.decode([0, 3]) == "<unk> "


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("run", FIXTURE["runs"], ids=lambda run: f"t{run['temperature']}-s{run['seed']}")
def test_stdout_equals_run_c(char_model, run, workers):
    model, tokenizer = char_model
    result = run_llmtp("generate", model, "-z", tokenizer, "-t", run["temperature"], "-s", run["seed"],
                       "-n", run["steps"], "-i", run["prompt"], "--workers", workers, text=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == bytes.fromhex(run["stdout_hex"])


STORIES_FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "runc_stories260K.json").read_text())


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("run", STORIES_FIXTURE["runs"], ids=lambda run: f"t{run['temperature']}-s{run['seed']}")
def test_stories260k_stdout_equals_run_c(stories260k, run, workers):
    assert hashlib.sha256(stories260k["model"].read_bytes()).hexdigest() == STORIES_FIXTURE["model_sha256"]
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", run["temperature"],
                       "-s", run["seed"], "-n", run["steps"], "-i", run["prompt"], "--workers", workers, text=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == bytes.fromhex(run["stdout_hex"])
