"""With the `oracle` extra installed (torch, transformers): random Llama folders saved by
save_pretrained right here, in shapes the committed fixtures do not cover, against
LlamaForCausalLM's logits. Skipped without torch; the committed fixtures cover the default suite."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtp.common.formats.load import load_model  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402

from inproc_cluster import ThreadedCluster  # noqa: E402

SHAPES = {
    "gqa_3to1_tied_bf16": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                               tie_word_embeddings=True, dtype=torch.bfloat16, rope_theta=100000.0),
    "mqa_untied_fp16_sharded": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                    tie_word_embeddings=False, dtype=torch.float16, rope_theta=10000.0,
                                    shard="20KB"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_save_pretrained_folder_matches_transformers(tmp_path, name):
    spec = dict(SHAPES[name])
    dtype, shard, theta = spec.pop("dtype"), spec.pop("shard", None), spec.pop("rope_theta")
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=80, intermediate_size=96, num_hidden_layers=3,
                                      max_position_embeddings=32, rms_norm_eps=1e-6,
                                      rope_parameters={"rope_type": "default", "rope_theta": theta}, **spec)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            parameter.copy_((1 + 0.1 * torch.randn_like(parameter)) if parameter_name.endswith("norm.weight")
                            else 0.25 * torch.randn_like(parameter))
    model.to(dtype).save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    oracle = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = [1, 7, 79, 0, 33, 12, 12, 50, 2, 64]
    with torch.no_grad():
        expected = oracle(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    loaded = load_model(tmp_path)
    scale = np.abs(expected).max()
    for engine in (LocalEngine.from_checkpoint(loaded), ThreadedCluster(loaded.config, loaded.weights, 3)):
        ours = engine.step(np.array(ids), [StepSequence(0, 0, len(ids))], all_logits=True)
        assert np.abs(ours - expected).max() <= 1e-4 * scale
