"""A tiny Llama written as a GGUF file the way llama.cpp's converter writes one (tests only).

Tensor names, the q/k row permutation, tied embeddings (no ``output.weight``) and the gpt2-style
tokenizer metadata follow ``convert_hf_to_gguf.py``; linear weights can be stored quantized so the
dequantizing path of transformers' GGUF loader runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_llama(vocab_texts: list[str], seed: int = 0):
    """``(model, tokenizer)``: a seeded random 2-layer Llama with tied embeddings and a BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from csulora_lab.train import train_tokenizer

    tokenizer = train_tokenizer(vocab_texts, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so a wrong norm mapping cannot pass by all-ones luck
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tokenizer


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (its converter's ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
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


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, q/k permuted as llama.cpp stores them."""
    config = model.config
    tensors = {}
    for name, p in model.state_dict().items():
        w = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = w
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = w
        elif name == "lm_head.weight":
            continue  # tied to the embeddings
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                w = _permute(w, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = _permute(w, config.num_key_value_heads)
            tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight"] = w
    return tensors


def write_tiny_gguf(model, tokenizer, path: Path, quant: str | None = None) -> dict[str, np.ndarray]:
    """Write ``model`` + ``tokenizer`` to ``path``; 2-D weights quantized to ``quant`` (e.g. ``"Q4_1"``)
    except the embeddings. Returns the weights as the file holds them, dequantized (GGUF names)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(backend["vocab"], key=backend["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    stored = {}
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    for name, w in gguf_tensors(model).items():
        if qtype is not None and w.ndim == 2 and name != "token_embd.weight":
            packed = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(packed, qtype)
        else:
            writer.add_tensor(name, w)
            stored[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
