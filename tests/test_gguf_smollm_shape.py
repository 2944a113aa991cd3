"""A GGUF of the kind people download for SmolLM (9 heads / 3 kv heads, rope theta 100000, tied
embeddings, Q4_1 matrices, byte-level BPE with the smollm pre-tokenizer), shrunk to 3 layers
and a 512-token vocabulary: in-process and over 3 workers, logits near an independent float64
forward (tests/reference_forward.py) over gguf's own dequantization of the same blocks whose
products round their inputs to int8 blocks as llama.cpp's kernels do, and the same greedy tokens
over 3 workers as in-process."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from llmtp.common.formats.load import GGUF, load_model, load_model_tokenizer  # noqa: E402
from llmtp.common.model.config import ModelConfig  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402

from gguf_factory import stored_values, tokenizer_json_metadata, write_gguf  # noqa: E402
from inproc_cluster import ThreadedCluster  # noqa: E402
from model_factory import random_weights  # noqa: E402
import reference_forward  # noqa: E402
from reference_forward import ReferenceTransformer  # noqa: E402
from test_hf_tokenizer import train_byte_level  # noqa: E402

CONFIG = ModelConfig(dim=288, hidden_dim=768, n_layers=3, n_heads=9, n_kv_heads=3, vocab_size=512, seq_len=64,
                     shared_classifier=True, rope_theta=100000.0, norm_eps=1e-5)
PROMPT = "Once upon a time, 12 cats"
N_NEW = 10


@pytest.fixture(scope="module")
def smollm_like(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm")
    tokenizer_json = train_byte_level(tmp / "tok", digits=True)
    meta = tokenizer_json_metadata(json.loads(tokenizer_json.read_text()), "smollm")
    meta["tokens"] = meta["tokens"][:CONFIG.vocab_size]
    meta["token_types"] = meta["token_types"][:CONFIG.vocab_size]
    kept = set(meta["tokens"])
    meta["merges"] = [m for m in meta["merges"] if "".join(m.split(" ")) in kept]
    meta.update(bos_id=0, eos_id=0, add_bos=False)
    weights = random_weights(CONFIG, 42)
    path = write_gguf(tmp / "smollm-like-q4_1.gguf", CONFIG, weights, "Q4_1", tokenizer=meta)
    # the reference sees the blocks through gguf's dequantizer, never through ours
    for layer in weights.layers:
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(layer, name, stored_values(getattr(layer, name), "Q4_1"))
    weights.token_embedding = weights.classifier = stored_values(weights.token_embedding, "Q4_1")
    return path, weights


def greedy(step, prompt_ids: list[int]) -> list[int]:
    ids = list(prompt_ids)
    logits = step(ids, 0)
    for _ in range(N_NEW):
        ids.append(int(np.argmax(logits)))
        logits = step(ids[-1:], len(ids) - 1)
    return ids[len(prompt_ids):]


def test_greedy_equals_float64_reference(smollm_like, monkeypatch):
    path, reference_weights = smollm_like
    # the reference is run.c's forward, which fixes theta at 10000 (its eps, 1e-5, is CONFIG's)
    monkeypatch.setattr(reference_forward, "ROPE_THETA", CONFIG.rope_theta)
    assert reference_forward.NORM_EPS == CONFIG.norm_eps
    model = load_model(path)
    assert model.source_format == GGUF and model.config == CONFIG
    assert model.tensor_types["layers.2.wk"] == "Q4_1" and model.weights.classifier is model.weights.token_embedding
    tokenizer = load_model_tokenizer(model)
    prompt_ids = tokenizer.encode(PROMPT)
    assert tokenizer.decode(prompt_ids) == PROMPT and len(prompt_ids) > 5

    reference = ReferenceTransformer(CONFIG, reference_weights)
    reference_logits = []

    def reference_step(ids, start):
        out = [reference.forward(token, start + i) for i, token in enumerate(ids)]
        reference_logits.append(out[-1])
        return out[-1]

    expected = greedy(reference_step, prompt_ids)
    scale = np.abs(reference_logits[0]).max()
    # The same float64 forward with every product's input rounded to int8 blocks of 32, as
    # llama.cpp's Q4_1 kernels (and ours) round it
    quantized = ReferenceTransformer(CONFIG, reference_weights, int8_inputs=32)
    fed = prompt_ids + expected  # the reference's tokens, one at a time (every product a decode one)
    want = [quantized.forward(token, pos) for pos, token in enumerate(fed)]
    chosen = {}
    for label, engine in {"in-process": LocalEngine.from_checkpoint(model),
                          "3 workers": ThreadedCluster(model.config, model.weights, 3)}.items():
        def step(ids, start, engine=engine):
            return engine.step(np.array(ids), [StepSequence(0, start, len(ids))])[0]

        got = [step([token], pos) for pos, token in enumerate(fed)]
        chosen[label] = greedy(step, prompt_ids)  # prefill at once (tiles), then decode
        # Exact up to float32 until an activation lands within float32's error of an int8
        # rounding boundary: fed inputs 1e-6 apart, the two round it to neighbouring ints, and
        # the step's logits move by ~1-2% of their scale (measured worst here 2.0%, checked
        # against this forward run inside the engine's own float32 code); 4% allows that twice.
        assert max(np.abs(a - b).max() for a, b in zip(got, want)) <= 0.04 * scale, label
    assert chosen["3 workers"] == chosen["in-process"]

