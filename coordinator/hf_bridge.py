"""The same weights in Hugging Face transformers' LlamaForCausalLM: the logits oracle of
tools/make_hf_fixture.py and the peer in `llmtp bench --compare-hf`.

Needs the `oracle` extra (torch, transformers); nothing in the runtime imports it.
"""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.quantize import as_float32
from llmtp.common.model.weights import ModelWeights


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from llama2.c's interleaved RoPE pairs to HF's rotate-half order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(config: ModelConfig, attention: str = "eager") -> LlamaConfig:
    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim,
                     intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layers,
                     num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                     head_dim=config.head_dim, max_position_embeddings=config.seq_len,
                     rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                     hidden_act="silu", attention_bias=False, mlp_bias=False,
                     tie_word_embeddings=config.shared_classifier, bos_token_id=1, eos_token_id=2)
    hf._attn_implementation = attention
    return hf


def build_hf_model(config: ModelConfig, weights: ModelWeights, attention: str = "eager") -> LlamaForCausalLM:
    """A float32 LlamaForCausalLM holding exactly the checkpoint's weights (int8 ones dequantized)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(config, attention)).float().eval()

    def tensor(matrix) -> torch.Tensor:
        return torch.from_numpy(np.array(as_float32(matrix), dtype=np.float32))

    def put(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
        assert parameter.shape == value.shape, (parameter.shape, value.shape)
        parameter.copy_(value)

    with torch.no_grad():
        put(model.model.embed_tokens.weight, tensor(weights.token_embedding))
        for layer, hf_layer in zip(weights.layers, model.model.layers):
            put(hf_layer.input_layernorm.weight, tensor(layer.attn_norm))
            put(hf_layer.self_attn.q_proj.weight, permute(tensor(layer.wq), config.n_heads))
            put(hf_layer.self_attn.k_proj.weight, permute(tensor(layer.wk), config.n_kv_heads))
            put(hf_layer.self_attn.v_proj.weight, tensor(layer.wv))
            put(hf_layer.self_attn.o_proj.weight, tensor(layer.wo))
            put(hf_layer.post_attention_layernorm.weight, tensor(layer.ffn_norm))
            put(hf_layer.mlp.gate_proj.weight, tensor(layer.w1))
            put(hf_layer.mlp.down_proj.weight, tensor(layer.w2))
            put(hf_layer.mlp.up_proj.weight, tensor(layer.w3))
        put(model.model.norm.weight, tensor(weights.final_norm))
        if config.shared_classifier:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        else:
            put(model.lm_head.weight, tensor(weights.classifier))
    return model


def hf_logits(model: LlamaForCausalLM, ids: list[int]) -> np.ndarray:
    """(T,) ids at positions 0..T-1 in one causal forward pass -> (T, vocab_size) float32."""
    with torch.no_grad():
        output = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return output.logits[0].float().numpy()
