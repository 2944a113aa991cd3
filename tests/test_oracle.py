"""The runtime's logits over the first 16 positions against two independent oracles.

- HF transformers' LlamaForCausalLM with the same weights: committed fixtures in tests/fixtures,
  made by tools/make_hf_fixture.py (torch and transformers stay out of the runtime's dependencies).
- tests/reference_forward.py: llama2.c run.c's forward() as plain loops, sharing no code with common/.

Both the batched prefill (all 16 tokens in one step) and token-by-token decoding are held to
1e-4 max abs; the two paths must also agree with each other within 1e-5 (+ 1e-6 relative).
"""

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.model.transformer import StepSequence
from model_factory import make_config, write_random_checkpoint
from reference_forward import reference_logits

TOLERANCE = 1e-4  # max abs logit error against an oracle
# One batched step vs 16 single-token steps: BLAS sums in another order (gemm vs gemv), so the
# two differ by float32 rounding only: 1e-5 absolute, plus 1e-6 relative (~8 float32 ulps) for
# stories260K's logits of magnitude 10-20, where 1e-5 alone is ~10 ulps (measured 1.05e-5).
PREFILL_VS_DECODE = 1e-5
PREFILL_VS_DECODE_RELATIVE = 1e-6
N_POSITIONS = 16
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = MODELS / "stories260K" / "stories260K.bin"
NO_STORIES = f"{STORIES} is absent (../shared/models is not part of a fresh clone)"
RANDOM_IDS = [1, 5, 66, 0, 17, 42, 8, 8, 31, 60, 2, 13, 55, 21, 34, 9]


def hf_fixture(name: str) -> tuple[dict, np.ndarray]:
    """(description, (16, vocab) float32 logits) of tests/fixtures/hf_<name>.*"""
    description = json.loads((FIXTURES / f"hf_{name}.json").read_text())
    logits = np.load(FIXTURES / description["logits_file"], allow_pickle=False)
    assert logits.shape == (N_POSITIONS, description["config"]["vocab_size"]), logits.shape
    return description, logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Case:
    """One model read back from a checkpoint file, a prompt, and its logits computed once."""

    def __init__(self, path: Path, ids: list[int]):
        self.path = path
        self.checkpoint = load_checkpoint(path)
        self.config = self.checkpoint.config
        self.weights = self.checkpoint.weights  # int8 QuantizedMatrix objects for a version-2 file
        self.ids = np.asarray(ids, dtype=np.int64)
        assert len(self.ids) == N_POSITIONS

    @cached_property
    def reference(self) -> np.ndarray:
        # a version 2 file multiplies as runq.c does: product inputs rounded to int8 per group
        # (measured 5e-7 from the engine; the reference without that rounding is 0.015-0.05 away)
        return reference_logits(self.config, self.weights, self.ids, self.checkpoint.group_size or None)

    @cached_property
    def prefill(self) -> np.ndarray:
        engine = LocalEngine(self.config, self.weights)
        return engine.step(self.ids, [StepSequence(0, 0, len(self.ids))], all_logits=True)

    @cached_property
    def decode(self) -> np.ndarray:
        engine = LocalEngine(self.config, self.weights)
        rows = [engine.step(self.ids[pos:pos + 1], [StepSequence(0, pos, 1)], all_logits=True)[0]
                for pos in range(len(self.ids))]
        return np.stack(rows)


def random_case(folder: Path, name: str, config_kwargs: dict, seed: int, version: int = 1,
                group_size: int | None = None) -> Case:
    config = make_config(**config_kwargs)
    path = write_random_checkpoint(folder / f"{name}.bin", config, seed, version, group_size)
    return Case(path, [token % config.vocab_size for token in RANDOM_IDS])


def build_case(name: str, folder: Path) -> Case:
    if name == "stories260K":
        if not STORIES.exists():
            pytest.skip(NO_STORIES)
        return Case(STORIES, hf_fixture("stories260K")[0]["token_ids"])
    if name == "random_gqa_separate":  # the HF fixture's model, rebuilt from its JSON
        description = hf_fixture(name)[0]
        return random_case(folder, name, description["config"], description["seed"],
                           description["checkpoint_version"])
    if name == "random_shared":  # version 0 file, classifier = embedding
        return random_case(folder, name, dict(shared_classifier=True), seed=7, version=0)
    if name == "random_odd":  # 5 query heads on 1 kv head, odd hidden and vocab
        return random_case(folder, name, dict(dim=40, hidden_dim=37, n_layers=3, n_heads=5, n_kv_heads=1,
                                              vocab_size=53, seq_len=20), seed=11)
    if name == "int8_separate":  # version 2, group size 32, separate int8 classifier
        return random_case(folder, name, dict(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2), seed=21,
                           version=2, group_size=32)
    if name == "int8_shared":  # version 2, default group size (4), int8 embedding as classifier
        return random_case(folder, name, dict(shared_classifier=True), seed=22, version=2)
    raise KeyError(name)


CASES = ["stories260K", "random_gqa_separate", "random_shared", "random_odd", "int8_separate", "int8_shared"]
HF_FIXTURES = ["stories260K", "random_gqa_separate"]
MODES = ["prefill", "decode"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> Case, built on first use and shared by every test of this module."""
    folder = tmp_path_factory.mktemp("oracle")
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = build_case(name, folder)
        return built[name]

    return get


def max_abs(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def check_hf_inputs(name: str, case: Case, description: dict) -> None:
    """The fixture was made from these very weights and ids, or the comparison means nothing."""
    assert sha256(case.path) == description["checkpoint_sha256"], (
        f"{case.path} differs from the weights hf_{name}.npy was made from; "
        "regenerate with tools/make_hf_fixture.py")
    assert case.ids.tolist() == description["token_ids"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", HF_FIXTURES)
def test_engine_matches_hf(cases, name, mode):
    case = cases(name)
    description, hf_logits = hf_fixture(name)
    check_hf_inputs(name, case, description)
    error = max_abs(getattr(case, mode), hf_logits)
    assert error <= TOLERANCE, f"{name} {mode}: max abs {error:.3g} vs HF transformers"


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_reference_matches_hf(cases, name):
    """The two oracles agree with each other, so neither hides a shared mistake of the runtime."""
    case = cases(name)
    description, hf_logits = hf_fixture(name)
    check_hf_inputs(name, case, description)
    error = max_abs(case.reference, hf_logits)
    assert error <= TOLERANCE, f"{name}: reference_forward and HF differ by {error:.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_engine_matches_reference(cases, name, mode):
    case = cases(name)
    error = max_abs(getattr(case, mode), case.reference)
    assert error <= TOLERANCE, f"{name} {mode}: max abs {error:.3g} vs reference_forward"


@pytest.mark.parametrize("name", CASES)
def test_prefill_equals_decode(cases, name):
    case = cases(name)
    np.testing.assert_allclose(case.prefill, case.decode, rtol=PREFILL_VS_DECODE_RELATIVE,
                               atol=PREFILL_VS_DECODE, err_msg=f"{name}: batched prefill vs token-by-token decode")


def test_reference_follows_run_c_greedy(cases):
    """The loop oracle's argmax at each prompt position is run.c's next greedy token (REFERENCE.md)."""
    case = cases("stories260K")
    expected_next = case.ids[1:].tolist() + [338]  # ALL_IDS[15] of s260_once_t0_n64
    assert case.reference.argmax(axis=1).tolist() == expected_next


def test_int8_case_is_quantized(cases):
    """The int8 cases really run on Q8_0 matrices, not on fp32 copies."""
    for name in ("int8_separate", "int8_shared"):
        case = cases(name)
        assert case.checkpoint.version == 2
        assert hasattr(case.weights.classifier, "scales") and hasattr(case.weights.layers[0].wq, "scales")


@pytest.mark.parametrize("field, value", [("rope_theta", 500000.0), ("norm_eps", 1e-2)])
def test_rope_theta_and_norm_eps_of_the_config_are_used(field, value):
    """A GGUF or Hugging Face model's own theta and epsilon reach both the runtime and the oracle:
    the logits match each other, and differ from the same weights run with llama2.c's values."""
    from dataclasses import replace
    from model_factory import random_weights
    base = make_config(seq_len=N_POSITIONS)
    weights = random_weights(base, seed=11)
    config = replace(base, **{field: value})

    def engine_logits(cfg):
        return LocalEngine(cfg, weights).step(np.asarray(RANDOM_IDS), [StepSequence(0, 0, N_POSITIONS)],
                                              all_logits=True)

    own, llama2c = engine_logits(config), engine_logits(base)
    assert max_abs(own, reference_logits(config, weights, RANDOM_IDS)) <= TOLERANCE
    assert max_abs(own, llama2c) > 100 * TOLERANCE
