"""Make the HF-transformers oracle fixtures that tests/test_oracle.py compares the runtime against.

Each fixture is the logits of Hugging Face's LlamaForCausalLM, loaded with the same weights as a
llama2.c checkpoint, over the first 16 positions of a prompt:
  tests/fixtures/hf_<name>.npy   (16, vocab_size) float32 logits, np.save(allow_pickle=False)
  tests/fixtures/hf_<name>.json  what went in: checkpoint and its sha256 (or random config + seed),
                                 token ids, torch/transformers versions
Fixtures:
  stories260K          ../shared/models/stories260K/stories260K.bin, BOS then the first 15 of
                       REFERENCE.md's ALL_IDS for "Once upon a time" (shared classifier, GQA 8/4)
  random_gqa_separate  tests/model_factory.random_weights(make_config(dim=48, hidden_dim=100,
                       n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=32,
                       shared_classifier=False), seed 1234); the test regenerates the weights from
                       the JSON and checks them against the sha256 of their version-1 file

torch and transformers are not runtime dependencies; they live in a separate venv:
  python3 -m venv /work/hfvenv
  /work/hfvenv/bin/pip install torch==2.13.0 transformers numpy sentencepiece msgpack pyzmq pyyaml
  /work/hfvenv/bin/pip install -e .          # from the repository root
Regenerate every fixture (from the repository root, with ../shared/models present):
  /work/hfvenv/bin/python tools/make_hf_fixture.py
or one of them with --only NAME; or any checkpoint with
  /work/hfvenv/bin/python tools/make_hf_fixture.py --checkpoint PATH --ids "1 2 3 ..." --name NAME

Weight mapping. llama2.c (like Meta's original Llama) rotates interleaved pairs (2i, 2i+1) of each
head; HF's rotate_half rotates (i, i + head_dim/2). HF's convert_llama_weights_to_hf.py permutes
the rows of wq and wk to match, and llama2.c's export.py undoes it with permute_reverse:
  permute(w, n_heads, rows, cols) = w.view(n_heads, rows // n_heads // 2, 2, cols)
                                     .transpose(1, 2).reshape(rows, cols)
applied here with n_heads for wq and n_kv_heads (rows kv_dim) for wk. Everything else maps
one to one: rms_norm_eps 1e-5, rope_theta 10000, attention_bias False, float32, the classifier
tied to the embedding when the checkpoint shares it, eager attention.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from llmtp.common.formats.checkpoint import load_checkpoint  # noqa: E402
from llmtp.common.model.config import ModelConfig  # noqa: E402
from llmtp.common.model.weights import ModelWeights  # noqa: E402
from llmtp.coordinator.hf_bridge import build_hf_model, hf_logits  # noqa: E402
from model_factory import make_config, random_weights, write_random_checkpoint  # noqa: E402

MODELS = REPO.parent / "shared" / "models"
FIXTURES = REPO / "tests" / "fixtures"
N_POSITIONS = 16

STORIES_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
RANDOM_CONFIG = dict(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67,
                     seq_len=32, shared_classifier=False)
RANDOM_SEED = 1234
RANDOM_IDS = [1, 5, 66, 0, 17, 42, 8, 8, 31, 60, 2, 13, 55, 21, 34, 9]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_fixture(out_dir: Path, name: str, config: ModelConfig, weights: ModelWeights, ids: list[int],
                  inputs: dict) -> Path:
    """Run HF on `ids` and write hf_<name>.npy and hf_<name>.json; returns the JSON path."""
    if len(ids) != N_POSITIONS:
        raise SystemExit(f"{name}: {len(ids)} token ids, expected {N_POSITIONS}")
    if not all(0 <= token < config.vocab_size for token in ids):
        raise SystemExit(f"{name}: token ids must lie in 0..{config.vocab_size - 1}")
    logits = hf_logits(build_hf_model(config, weights), ids)
    assert logits.shape == (len(ids), config.vocab_size), logits.shape
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / f"hf_{name}.npy", logits.astype("<f4"), allow_pickle=False)
    description = {
        "name": name, **inputs, "token_ids": list(ids), "positions": f"0..{len(ids) - 1}",
        "logits_file": f"hf_{name}.npy", "logits_shape": list(logits.shape), "logits_dtype": "float32",
        "oracle": "transformers LlamaForCausalLM, eager attention, float32, wq/wk permuted to rotate-half",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "numpy_version": np.__version__, "made_by": "tools/make_hf_fixture.py",
    }
    json_path = out_dir / f"hf_{name}.json"
    json_path.write_text(json.dumps(description, indent=2) + "\n")
    return json_path


def make_checkpoint_fixture(out_dir: Path, name: str, path: Path, ids: list[int]) -> Path:
    ckpt = load_checkpoint(path)
    shown = path.resolve().relative_to(MODELS) if path.resolve().is_relative_to(MODELS) else path.name
    inputs = {"source": "checkpoint", "checkpoint": str(shown), "checkpoint_version": ckpt.version,
              "checkpoint_sha256": sha256(path), "config": asdict(ckpt.config)}
    return write_fixture(out_dir, name, ckpt.config, ckpt.weights, ids, inputs)


def make_random_fixture(out_dir: Path) -> Path:
    config = make_config(**RANDOM_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:  # the sha256 pins the weights the test regenerates
        checkpoint_sha = sha256(write_random_checkpoint(Path(tmp) / "random.bin", config, RANDOM_SEED, 1))
    inputs = {"source": "model_factory.random_weights", "config": asdict(config), "seed": RANDOM_SEED,
              "checkpoint_version": 1, "checkpoint_sha256": checkpoint_sha}
    return write_fixture(out_dir, "random_gqa_separate", config, random_weights(config, RANDOM_SEED),
                         RANDOM_IDS, inputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="output folder (default tests/fixtures)")
    parser.add_argument("--only", choices=("stories260K", "random_gqa_separate"))
    parser.add_argument("--checkpoint", type=Path, help="any llama2.c checkpoint instead of the built-in fixtures")
    parser.add_argument("--ids", help=f"with --checkpoint: {N_POSITIONS} token ids, space separated")
    parser.add_argument("--name", help="with --checkpoint: fixture name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.checkpoint:
        if not (args.ids and args.name):
            parser.error("--checkpoint needs --ids and --name")
        written = [make_checkpoint_fixture(args.out, args.name, args.checkpoint,
                                           [int(token) for token in args.ids.split()])]
    else:
        written = []
        if args.only in (None, "stories260K"):
            written.append(make_checkpoint_fixture(args.out, "stories260K",
                                                   MODELS / "stories260K" / "stories260K.bin", STORIES_IDS))
        if args.only in (None, "random_gqa_separate"):
            written.append(make_random_fixture(args.out))
    for path in written:
        print(f"wrote {path} and {path.with_suffix('.npy').name}")


if __name__ == "__main__":
    main()
