"""Make the tiny Hugging Face Llama folders that tests/test_hf_folder.py loads, with transformers' logits.

Each fixture tests/fixtures/hf_folders/<name>/ is what LlamaForCausalLM.save_pretrained writes
(config.json, model.safetensors or shards plus model.safetensors.index.json) for a small random
model, plus
  logits.npy    (16, vocab_size) float32: LlamaForCausalLM's logits over `token_ids`, computed in
                float32 from the weights as stored (fp16/bf16 ones widened), eager attention
  fixture.json  token ids, seed, torch/transformers versions, made_by
Fixtures (all 2 layers, dim 32, head_dim 8, FFN 64, vocab 64, 32 positions):
  fp32_gqa_tied        4 heads / 2 kv heads, tied embeddings, one file, rope_theta 10000, eps 1e-5
  bf16_gqa_sharded     4 / 2, separate lm_head, bfloat16, sharded, rope_theta 50000, eps 1e-6
  fp16_mha_untied      4 / 4, separate lm_head, float16, one file, rope_theta 500000, eps 1e-5
And tests/fixtures/hf_tokenizers/tok512/: the tokenizer.json transformers' LlamaTokenizer makes
from ../shared/models/stories260K/tok512.model (a SentencePiece-style tokenizer.json written by
transformers, not by this project), with tokenizer_config.json's add_bos_token set to true as
Llama 2's folders have it.
torch and transformers come from the `oracle` extra, in their own venv (protobuf to read .model):
  python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors protobuf
  /tmp/hfvenv/bin/python tools/make_hf_folder_fixtures.py      # from the repository root
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "hf_folders"
TOKEN_IDS = [1, 5, 63, 0, 17, 42, 8, 8, 31, 60, 2, 13, 55, 21, 34, 9]
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32, hidden_act="silu", bos_token_id=1, eos_token_id=2)
FIXTURES = {
    "fp32_gqa_tied": dict(config=dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                                      rms_norm_eps=1e-5), dtype=torch.float32, shard=None, seed=11),
    "bf16_gqa_sharded": dict(config=dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0,
                                         rms_norm_eps=1e-6), dtype=torch.bfloat16, shard="12KB", seed=12),
    "fp16_mha_untied": dict(config=dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0,
                                        rms_norm_eps=1e-5), dtype=torch.float16, shard=None, seed=13),
}
WEIGHT_STD = 0.25  # larger than transformers' 0.02 so that logits are far from zero
NORM_SPREAD = 0.1


def make(name: str, spec: dict, out: Path) -> Path:
    torch.manual_seed(spec["seed"])
    settings = dict(COMMON, **spec["config"])
    theta = settings.pop("rope_theta")
    config = LlamaConfig(**settings, rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.copy_(1 + NORM_SPREAD * torch.randn_like(parameter))
            else:
                parameter.copy_(WEIGHT_STD * torch.randn_like(parameter))
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.to(spec["dtype"]).save_pretrained(folder, **({"max_shard_size": spec["shard"]} if spec["shard"] else {}))
    # The oracle is the folder as transformers loads it, in float32. (Not the model above cast
    # back: .to(bfloat16) also rounds RoPE's inv_freq buffer, which loading recomputes.)
    saved = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = saved(input_ids=torch.tensor([TOKEN_IDS]), use_cache=False).logits[0].numpy()
    (folder / "generation_config.json").unlink(missing_ok=True)
    np.save(folder / "logits.npy", logits.astype("<f4"), allow_pickle=False)
    (folder / "fixture.json").write_text(json.dumps({
        "name": name, "token_ids": TOKEN_IDS, "seed": spec["seed"], "weight_std": WEIGHT_STD,
        "dtype": str(spec["dtype"]), "sharded": bool(spec["shard"]),
        "oracle": "transformers LlamaForCausalLM, eager attention, float32 compute",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "made_by": "tools/make_hf_folder_fixtures.py"}, indent=2) + "\n")
    return folder


def make_tokenizer(out: Path) -> Path:
    import tempfile

    from transformers import LlamaTokenizer

    source = REPO.parent / "shared" / "models" / "stories260K" / "tok512.model"
    folder = out / "tok512"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source, Path(tmp) / "tokenizer.model")
        LlamaTokenizer.from_pretrained(tmp).save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, spec in FIXTURES.items():
        folder = make(name, spec, args.out)
        print(f"wrote {folder} ({sum(p.stat().st_size for p in folder.iterdir()):,} bytes)")
    print(f"wrote {make_tokenizer(args.out.parent / 'hf_tokenizers')}")


if __name__ == "__main__":
    main()
