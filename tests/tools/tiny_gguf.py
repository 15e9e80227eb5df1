"""Write a tiny random-weight llama model (GGUF, ~0.5 MB) that llama.cpp's server can load, offline.

Random weights would emit invalid UTF-8 and end at random. One residual channel is held at 1.0 in every
embedding and never written by a layer; that column of ``output.weight`` then acts as a logit bias that
forbids non-printable bytes and the end tokens, so the model prints ASCII and always runs to max_tokens.
Greedy decoding (temperature 0) is deterministic. Usage: python tests/tools/tiny_gguf.py OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

D_MODEL, N_HEADS, N_LAYERS, FFN, CONTEXT = 64, 4, 2, 128, 4096
BIAS_CHANNEL = D_MODEL - 1
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def vocabulary() -> tuple[list[str], list[bool]]:
    """Tokens and whether each may be generated (printable ASCII only)."""
    byte_chars = bytes_to_unicode()
    char_to_byte = {c: b for b, c in byte_chars.items()}
    tokens = [*SPECIALS, *(byte_chars[b] for b in range(256)), *(a + b for a, b in MERGES)]

    def printable(token: str) -> bool:
        if token in SPECIALS:
            return False
        return all(0x20 <= char_to_byte[c] <= 0x7E for c in token)

    return tokens, [printable(t) for t in tokens]


def write(path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens, allowed = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D_MODEL // N_HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_eot_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def rand(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = rand(n_vocab, D_MODEL, scale=0.05)
    embd[:, BIAS_CHANNEL] = 1.0
    output = rand(n_vocab, D_MODEL, scale=0.5)
    output[:, BIAS_CHANNEL] = np.where(allowed, 0.0, -50.0)
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(D_MODEL, dtype=np.float32))
    w.add_tensor("output.weight", output)
    for i in range(N_LAYERS):
        attn_out = rand(D_MODEL, D_MODEL)
        ffn_down = rand(D_MODEL, FFN)
        attn_out[BIAS_CHANNEL, :] = 0.0  # no layer writes the bias channel
        ffn_down[BIAS_CHANNEL, :] = 0.0
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D_MODEL, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(D_MODEL, D_MODEL))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(D_MODEL, D_MODEL))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(D_MODEL, D_MODEL))
        w.add_tensor(f"blk.{i}.attn_output.weight", attn_out)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D_MODEL, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(FFN, D_MODEL))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(FFN, D_MODEL))
        w.add_tensor(f"blk.{i}.ffn_down.weight", ffn_down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    write(Path(sys.argv[1]))
