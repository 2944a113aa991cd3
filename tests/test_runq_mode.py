"""runq.c's greedy text on stories260K converted to version 2, reproduced with the llama2.c-mode
kernel on every backend (fixture: tools/record_runq_fixtures.py, runq.c built with -O3)."""

import hashlib
import json
from pathlib import Path

import pytest

from llmtp.common import kernels
from llmtp.common.formats.checkpoint import convert_checkpoint
from llmtp.common.formats.tokenizer import load_tokenizer

from runq_forward import greedy_stdout

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "runq_stories260K.json").read_text())


@pytest.fixture(scope="module")
def stories_v2(stories260k, tmp_path_factory):
    path = tmp_path_factory.mktemp("runq") / "stories260K_v2.bin"
    checkpoint = convert_checkpoint(stories260k["model"], path, version=2)
    assert checkpoint.group_size == FIXTURE["group_size"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == FIXTURE["model_sha256"], "converter output changed"
    tokenizer = load_tokenizer(stories260k["tokenizer"], checkpoint.config.vocab_size)
    return checkpoint, tokenizer


@pytest.mark.parametrize("backend", ["avx2", "portable", "numpy"])
@pytest.mark.parametrize("run", FIXTURE["runs"], ids=lambda run: run["prompt"] or "empty")
def test_greedy_text_equals_runq(stories_v2, backend, run):
    if backend not in kernels.available_backends():
        pytest.skip(f"kernel backend {backend} not available here ({kernels.backend_info()})")
    checkpoint, tokenizer = stories_v2
    previous = kernels.use_backend(backend)
    try:
        stdout = greedy_stdout(checkpoint.config, checkpoint.weights, tokenizer, run["prompt"], run["steps"])
    finally:
        kernels.use_backend(previous)
    expected = bytes.fromhex(run["stdout_hex"])
    assert stdout == expected, f"first difference at byte {next(i for i, (a, b) in enumerate(zip(stdout + b'?', expected)) if a != b)}"
