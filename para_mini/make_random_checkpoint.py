# python -m para_mini.make_random_checkpoint --shape 7b --dtype bf16 --out DIR: a LLaMA-2-shaped checkpoint of
# random weights in Hugging Face's layout (config.json, model-0000N-of-0000M.safetensors shards and their
# model.safetensors.index.json; no tokenizer), to check para_mini against transformers at full size without the
# real weights (python -m para_mini.equivalence). Written one tensor at a time: a 7B model never sits in memory.
#
# The safetensors format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
# and byte range, then the bytes; every range is known before any tensor is made, so each shard's header is written
# first and its tensors after it, made and written one by one.
import argparse
import json
import math
import struct
from pathlib import Path

import torch

from .params import PRESETS

DTYPES = {"fp32": (torch.float32, "F32"), "bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16")}


def hf_tensors(args) -> list:
    """(Hugging Face name, shape) of every tensor of a LLaMA-2 of shape args, in the order of the layers."""
    dim, kv, ffn = args.dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    per_layer = [("self_attn.q_proj.weight", (dim, dim)), ("self_attn.k_proj.weight", (kv, dim)),
                 ("self_attn.v_proj.weight", (kv, dim)), ("self_attn.o_proj.weight", (dim, dim)),
                 ("mlp.gate_proj.weight", (ffn, dim)), ("mlp.up_proj.weight", (ffn, dim)),
                 ("mlp.down_proj.weight", (dim, ffn)), ("input_layernorm.weight", (dim,)),
                 ("post_attention_layernorm.weight", (dim,))]
    return ([("model.embed_tokens.weight", (args.vocab_size, dim))]
            + [(f"model.layers.{i}.{name}", shape) for i in range(args.n_layers) for name, shape in per_layer]
            + [("model.norm.weight", (dim,)), ("lm_head.weight", (args.vocab_size, dim))])


def random_tensor(name, shape, dtype, g):
    if name.endswith("norm.weight"):  # not all ones: a swapped attention / FFN norm must show
        return (0.5 + torch.rand(shape, generator=g)).to(dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)  # LLaMA's initialisation


def write_shard(file, tensors, dtype, tag, g):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            f.write(random_tensor(name, shape, dtype, g).contiguous().view(torch.uint8).numpy())


def make(shape: str, dtype: str, out, shards: int = 3, seed: int = 0):
    args, (torch_dtype, tag) = PRESETS[shape], DTYPES[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(args)
    sizes = [math.prod(s) * torch_dtype.itemsize for _, s in tensors]
    total, g = sum(sizes), torch.Generator().manual_seed(seed)
    groups, done = [[] for _ in range(shards)], 0  # consecutive tensors, about total / shards bytes a shard
    for t, size in zip(tensors, sizes):
        groups[min(shards - 1, done * shards // total)].append(t)
        done += size
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_shard(out / file, group, torch_dtype, tag, g)
        weight_map |= {name: file for name, _ in group}
        print(f"{out / file}: {len(group)} tensors", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(torch_dtype).removeprefix("torch.")}, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a LLaMA-2-shaped checkpoint of random weights in Hugging Face's "
                                "layout (sharded safetensors, index, config.json), one tensor at a time.")
    p.add_argument("--shape", choices=sorted(PRESETS), default="7b", help="the model's shape (default 7b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the stored dtype (default bf16)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--shards", type=int, default=3, help="safetensors files (default 3)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make(a.shape, a.dtype, a.out, a.shards, a.seed)


if __name__ == "__main__":
    main()
