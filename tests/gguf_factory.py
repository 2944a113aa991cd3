"""GGUF files for tests, written with the `gguf` package's own GGUFWriter and quantizers.

Tensors are named and laid out as llama.cpp's converters write them; q/k rows are taken in
llama2.c's interleaved order (what llama.cpp's converter produces from Hugging Face weights
with its permute, `hf_to_interleaved` here).
"""

from pathlib import Path

import numpy as np

from llmtp.common.model.matrices import F32Matrix

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.quantize import as_float32
from llmtp.common.model.weights import ModelWeights

GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                    "w3": "ffn_up"}


def hf_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> pair rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def encode(values: np.ndarray, ggml_type: str) -> tuple[np.ndarray, object]:
    """(array to hand GGUFWriter.add_tensor, raw_dtype) for float32 `values` in `ggml_type`."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[ggml_type]
    if ggml_type == "F32":
        return np.ascontiguousarray(values, dtype=np.float32), None
    if ggml_type == "F16":
        return np.ascontiguousarray(values, dtype=np.float16), None
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), kind), kind


def stored_values(values: np.ndarray, ggml_type: str) -> F32Matrix:
    """float32 of what a file of `ggml_type` holds for `values`, by gguf's own dequantizer."""
    from gguf import GGMLQuantizationType, quants

    data, kind = encode(values, ggml_type)
    if kind is None:
        return F32Matrix(data.astype(np.float32))
    return F32Matrix(quants.dequantize(data, kind).astype(np.float32).reshape(values.shape))


def write_gguf(path, config: ModelConfig, weights: ModelWeights, matrix_type: str = "F32",
               arch: str = "llama", extra: dict | None = None, tokenizer: dict | None = None,
               embedding_type: str | None = None, encoder=None) -> Path:
    """A llama GGUF: norms F32, every matrix (embedding too, unless embedding_type) in matrix_type.

    extra: more metadata, key -> value (str, int, float, bool) or (GGUFValueType, value).
    tokenizer: key -> value for tokenizer.ggml.* (see write_tokenizer_metadata).
    encoder: (name, float32 values, ggml_type) -> (array, raw_dtype) instead of `encode`."""
    import gguf

    from llmtp.common.formats.gguf_file import add_llama_metadata

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    add_llama_metadata(writer, config)
    writer.add_rope_dimension_count(config.head_dim)
    for key, value in (extra or {}).items():
        _add_value(writer, key, value)
    if tokenizer:
        write_tokenizer_metadata(writer, tokenizer)

    def add(name: str, tensor, ggml_type: str) -> None:
        data, raw_dtype = (encoder(name, as_float32(tensor), ggml_type) if encoder and ggml_type != "F32"
                           else encode(as_float32(tensor), ggml_type))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)

    add("token_embd.weight", weights.token_embedding, embedding_type or matrix_type)
    for i, layer in enumerate(weights.layers):
        for field, gguf_name in GGUF_LAYER_NAMES.items():
            add(f"blk.{i}.{gguf_name}.weight", getattr(layer, field),
                "F32" if field.endswith("norm") else matrix_type)
    add("output_norm.weight", weights.final_norm, "F32")
    if not config.shared_classifier:
        add("output.weight", weights.classifier, matrix_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer, key: str, value) -> None:
    import gguf

    if isinstance(value, tuple):
        writer.add_key_value(key, value[1], value[0])
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def write_tokenizer_metadata(writer, tok: dict) -> None:
    """tok: model ('llama' or 'gpt2'), tokens, token_types, scores (llama), merges (gpt2), pre,
    bos_id, eos_id, unk_id, add_bos, add_eos, chat_template (each optional but model and tokens)."""
    writer.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    if "scores" in tok:
        writer.add_token_scores(tok["scores"])
    if "token_types" in tok:
        writer.add_token_types(tok["token_types"])
    if "merges" in tok:
        writer.add_token_merges(tok["merges"])
    for key, method in (("bos_id", "add_bos_token_id"), ("eos_id", "add_eos_token_id"),
                        ("unk_id", "add_unk_token_id"), ("add_bos", "add_add_bos_token"),
                        ("add_eos", "add_add_eos_token"), ("chat_template", "add_chat_template"),
                        ("remove_extra_whitespaces", "add_remove_extra_whitespaces")):
        if key in tok:
            getattr(writer, method)(tok[key])


def sentencepiece_metadata(model_path) -> dict:
    """tokenizer.ggml.* for a SentencePiece .model as llama.cpp's converter writes it
    (pieces with '▁', scores, token types, normalizer flags, BOS/EOS/UNK ids)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    types = []
    for i in range(sp.get_piece_size()):
        types.append(6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i)
                     else 5 if sp.is_unused(i) else 1)
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "scores": [sp.get_score(i) for i in range(sp.get_piece_size())], "token_types": types,
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "add_bos": True,
            "remove_extra_whitespaces": sp.normalize("a  a ") in ("a\u2581a", "\u2581a\u2581a")}


def tokenizer_json_metadata(tokenizer_json: dict, pre: str) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json, as llama.cpp's converter writes it."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    added = {token["id"]: token for token in tokenizer_json["added_tokens"]}
    for token_id, token in added.items():
        vocab[token["content"]] = token_id
    tokens = [None] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    types = [3 if i in added and added[i]["special"] else 4 if i in added else 1 for i in range(len(tokens))]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges, "token_types": types}


def random_k_blocks(rng, shape: tuple[int, int], ggml_type: str) -> np.ndarray:
    """(rows, bytes per row) uint8 of random Q4_K / Q6_K blocks with small finite fp16 scales
    (gguf can dequantize K-quants but not make them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    per_block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    n_blocks = shape[0] * shape[1] // per_block
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    size = 0.002 if ggml_type == "Q4_K" else 0.0001  # Q6_K's int8 scales reach 127 times 32
    scales = (rng.standard_normal((n_blocks, 2)) * size).astype(np.float16).view(np.uint8)
    if ggml_type == "Q4_K":  # d, dmin first
        blocks[:, 0:4] = scales
    else:  # Q6_K: d last
        blocks[:, block_bytes - 2:] = scales[:, :2]
    return blocks.reshape(shape[0], -1)
