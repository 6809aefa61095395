"""The demo chat model (backend/models/demo_text.py) as a GGUF file, for llama.cpp to serve in the tests.

What llama.cpp's convert_hf_to_gguf.py does for a Llama with a byte-level BPE tokenizer, for this one
small model: numpy + the `gguf` package only, so writing it needs neither torch nor llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Hugging Face tensor name (after "model.layers.N.") -> llama.cpp's, in convert_hf_to_gguf.py's map.
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Q/K rows from HF's rotate-half RoPE order to llama.cpp's interleaved pairs (LlamaModel.permute)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model_dir: Path, config: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for name, value in load_file(model_dir / "model.safetensors").items():
        stem = name.removesuffix(".weight")
        if stem in MODEL_TENSORS:
            gguf_name = MODEL_TENSORS[stem]
        else:
            _, _, layer, rest = stem.split(".", 3)  # model.layers.N.<rest>
            gguf_name = f"blk.{layer}.{LAYER_TENSORS[rest]}"
        if stem.endswith("q_proj"):
            value = permute(value, heads)
        elif stem.endswith("k_proj"):
            value = permute(value, kv_heads)
        out[f"{gguf_name}.weight"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Tokens (padded to the model's vocab size), their types, the merges, and the special ids."""
    from gguf import TokenType

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["pre_tokenizer"]["type"] == "ByteLevel"
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # the model's vocab is rounded up to a multiple of 64
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.CONTROL if index in special else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    settings = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {
        role: tokenizer["model"]["vocab"][settings[f"{role}_token"]] for role in ("bos", "eos", "unk", "pad")
    }
    return tokens, types, merges, ids


def chat_template(model_dir: Path) -> str:
    separate = model_dir / "chat_template.jinja"  # transformers >= 4.50 writes it beside tokenizer_config
    if separate.is_file():
        return separate.read_text(encoding="utf-8")
    return json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


def export_gguf(model_dir: Path, out_path: Path) -> Path:
    """Write the Hugging Face Llama in `model_dir` to `out_path` as a float32 GGUF llama.cpp can serve."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForCausalLM"], config["architectures"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer = gguf.GGUFWriter(out_path, arch="llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((config.get("rope_parameters") or config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, types, merges, ids = vocabulary(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # HF's ByteLevel(use_regex=True) splits text with GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(True)  # plain text gets <s> first, as the HF tokenizer's post-processor does
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(model_dir))

    for name, value in gguf_tensors(model_dir, config).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
