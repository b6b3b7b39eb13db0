# Loading LLaMA-2 checkpoints into para_mini's Transformer, from the three places they come from:
#   Hugging Face   a directory with config.json and model.safetensors (or shards + model.safetensors.index.json)
#   Meta           a directory with params.json and consolidated.NN.pth (several files: model-parallel shards)
#   llama2.c       a legacy (v0) .bin export, or a train.py .pt checkpoint
#
# The model is built on the meta device and every tensor is read from a memory-mapped file, converted and assigned
# one at a time, so a 7B model never exists twice in memory. Pickles are read with weights_only=True: a checkpoint
# must never run code. Every shape is checked before any data is read.
import json
import math
import pickle
import re
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .model import ModelArgs, Transformer, rope_frequencies


@dataclass
class Lazy:
    """One tensor of a checkpoint, in the model's layout, not read yet: its shape is known without touching data."""
    name: str  # its name (and file) in the checkpoint, for error messages
    shape: tuple  # None: the checkpoint lacks it
    read: Callable[[], torch.Tensor]


def permute_for_rope(w, n_heads: int):
    # Meta and llama2.c rotate channel pairs (2i, 2i+1) of each head (interleaved RoPE); Hugging Face and this model
    # rotate (i, i + head_dim/2) (rotate-half). Reordering the rows of wq / wk within each head maps one onto the
    # other, so q.k and therefore attention are unchanged. wk is permuted with n_kv_heads.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_model(path, dtype=torch.float32, device="cpu", max_seq_len=None) -> Transformer:
    path = Path(path)
    args, tensors, unused = read_checkpoint(path)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len

    with torch.device("meta"):  # shapes only: the weights are the checkpoint's tensors, assigned below
        model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(path, tensors, expected, unused)

    state, converted = {}, {}
    for name in expected:
        lazy = tensors[name]
        if id(lazy) not in converted:  # tied embedding and output: one tensor, converted once
            converted[id(lazy)] = lazy.read().to(device=device, dtype=dtype)
        state[name] = converted[id(lazy)]
    model.load_state_dict(state, strict=True, assign=True)
    if tensors["output.weight"] is tensors["tok_embeddings.weight"]:
        model.output.weight = model.tok_embeddings.weight

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: no checkpoint tensor was assigned to {left}")
    model.eval()
    model.requires_grad_(False)  # the backbone is frozen; adapters attached later are the only trainable weights
    return model


def read_checkpoint(path: Path):
    """-> (ModelArgs, {model name: Lazy}, [file names the model has no place for])."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a Hugging Face or Meta directory, "
                                "or a llama2.c .bin / .pt file")
    if path.is_dir():
        if (path / "config.json").exists():
            return read_hf(path)
        if (path / "params.json").exists():
            return read_meta(path)
        raise ValueError(f"{path}: unknown checkpoint directory: expected config.json + *.safetensors "
                         "(Hugging Face) or params.json + consolidated.NN.pth (Meta)")
    if path.suffix == ".bin":
        return read_llama2c_bin(path)
    if path.suffix in (".pt", ".pth"):
        return read_llama2c_pt(path)
    if path.suffix == ".safetensors" or path.name in ("config.json", "params.json"):
        raise ValueError(f"{path}: pass the directory that holds it ({path.parent}), not the file")
    raise ValueError(f"{path}: unknown checkpoint format: expected a Hugging Face or Meta directory, "
                     "or a llama2.c .bin / .pt file")


def first_few(items, n=5) -> str:
    # a config that does not fit its checkpoint misnames every tensor: 47 on the 260K model, 291 on 7B
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_tensors(path, tensors, expected, unused):
    missing = [tensors[n].name if n in tensors else n for n in expected
               if n not in tensors or tensors[n].shape is None]
    wrong = [f"{t.name} has shape {list(t.shape)}, the model expects {list(expected[n])}"
             for n, t in tensors.items() if n in expected and t.shape is not None and t.shape != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {first_few(missing)}")
    if unused:
        problems.append(f"unexpected tensors: {first_few(unused)}")
    if wrong:
        problems.append(f"tensors of the wrong shape ({len(wrong)}): " + first_few(wrong, 3))
    if problems:
        raise ValueError(f"{path} does not match the model its config describes: " + "; ".join(problems)
                         + ". Is the checkpoint complete, and does its config belong to it?")


def mapped(label: str, t, transform=None) -> Lazy:
    """A Lazy over a memory-mapped tensor (torch.load(mmap=True), the .bin map): nothing is read until used."""
    if t is None:
        return Lazy(label, None, None)
    return Lazy(label, tuple(t.shape), (lambda: transform(t)) if transform else (lambda: t))


def model_names(args: ModelArgs):
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
    return (["tok_embeddings.weight", "norm.weight", "output.weight"]
            + [f"layers.{i}.{p}.weight" for i in range(args.n_layers) for p in per_layer])


def rope_permutation(name: str, args: ModelArgs):
    """The Meta-to-HF row reordering a tensor needs, or None."""
    if name.endswith("attention.wq.weight"):
        return partial(permute_for_rope, n_heads=args.n_heads)
    if name.endswith("attention.wk.weight"):
        return partial(permute_for_rope, n_heads=args.n_kv_heads)
    return None


# ------------------------------------------------------------------------------------------------- Hugging Face

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def hf_name(name: str, tied: bool) -> str:
    if name == "tok_embeddings.weight" or (name == "output.weight" and tied):
        return "model.embed_tokens.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    i, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
    return f"model.layers.{i}.{HF_NAMES[module]}.weight"


def hf_args(config: dict, where) -> ModelArgs:
    def refuse(why):
        raise ValueError(f"{where}: {why}; para_mini implements plain LLaMA-2 and would compute wrong numbers")

    if config.get("model_type") != "llama":
        refuse(f"model_type is {config.get('model_type')!r}, not 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {config['hidden_act']!r}, not 'silu'")
    if config.get("attention_bias") or config.get("mlp_bias"):
        refuse("the projections have biases (attention_bias / mlp_bias)")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 writes rope_parameters
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse(f"RoPE scaling is set ({config.get('rope_scaling') or rope})")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        refuse(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads = {dim // n_heads}")
    # absent keys take LlamaConfig's defaults, so a config means here what it means to transformers
    return ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                     max_seq_len=config.get("max_position_embeddings", 2048))


def open_safetensors(file: Path):
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: the Hugging Face checkpoint is incomplete; download it again")
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:  # a bad header, or fewer bytes than the header promises
        raise ValueError(f"{file}: cannot read it as safetensors ({e}); it may be truncated or corrupt: "
                         "download it again") from e


def safetensor(name, file, handle) -> Lazy:
    if handle is None:
        return Lazy(name, None, None)
    return Lazy(f"{name} (in {file})", tuple(handle.get_slice(name).get_shape()), lambda: handle.get_tensor(name))


def read_hf(path: Path):
    config = json.loads((path / "config.json").read_text())
    args = hf_args(config, path / "config.json")
    tied = config.get("tie_word_embeddings", False)

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif list(path.glob("*.bin")):
        raise ValueError(f"{path}: only .safetensors Hugging Face checkpoints are read, and it has "
                         f"{[f.name for f in path.glob('*.bin')]}: re-save it with save_pretrained()")
    else:
        raise FileNotFoundError(f"{path}: config.json but no model.safetensors or model.safetensors.index.json")
    stored = {}  # tensor name -> (file, its open safetensors handle)
    for file in files:
        handle = open_safetensors(file)
        stored.update({name: (file, handle) for name in handle.keys()})

    tensors = {name: safetensor(hf_name(name, tied), *stored.get(hf_name(name, tied), (None, None)))
               for name in model_names(args)}
    if tied:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    used = {hf_name(n, tied) for n in model_names(args)}
    # RoPE tables older transformers saved (recomputed here), and a tied lm_head some exporters write anyway
    ignored = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq" + ("|lm_head\\.weight" if tied else ""))
    unused = [n for n in stored if n not in used and not ignored.fullmatch(n)]
    return args, tensors, unused


# --------------------------------------------------------------------------------------------------------- Meta

def torch_load(file: Path, mmap: bool = True, remedy: str = "Re-save the state dict alone, or as safetensors"):
    """torch.load with weights_only (a file cannot run code); one line of error for a file it cannot read, with
    `remedy` for one that holds Python objects. mmap=False for a file read once and then replaced (train.py's
    checkpoint)."""
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    try:
        return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        if detail:
            raise ValueError(f"{file}: refused to unpickle: it holds Python objects other than tensors and plain "
                             f"containers, and loading those could run code ({detail}). {remedy}") from e
        why = next((line.strip() for line in str(e).splitlines() if line.startswith("Unsupported")), "")
        raise ValueError(f"{file}: cannot read it as a PyTorch checkpoint ({why or type(e).__name__}): it is "
                         "truncated, corrupt or not a PyTorch file") from e  # a foreign file read as a legacy pickle
    except (RuntimeError, EOFError, OSError) as e:  # what torch raises for a short or foreign file
        why = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file's EOFError has no message
        raise ValueError(f"{file}: cannot read it as a PyTorch zip checkpoint ({why}): it is "
                         "truncated, corrupt, in the legacy non-zip format, or not a PyTorch file") from e


META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_seq_len"}
# model-parallel split dimension of each Meta weight (llama/model.py): ColumnParallelLinear splits its outputs
# (dim 0), RowParallelLinear its inputs (dim 1), ParallelEmbedding the embedding dimension (dim 1); norms are copies
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def meta_args(params: dict, vocab_size: int, where) -> ModelArgs:
    if params.get("use_scaled_rope"):
        raise ValueError(f"{where}: use_scaled_rope (Llama 3.1 RoPE scaling) is not implemented")
    unknown = set(params) - META_PARAMS - {"use_scaled_rope", "max_batch_size"}
    if unknown:
        raise ValueError(f"{where}: unknown parameters {sorted(unknown)}; refusing to guess what they change")
    params = {k: v for k, v in params.items() if k in META_PARAMS}
    if params.get("vocab_size", -1) == -1:  # Meta's files leave it to the tokenizer: take it from the embedding
        params["vocab_size"] = vocab_size
    return ModelArgs(**params)


def merge_shards(shards, name, label, transform) -> Lazy:
    """Meta's model-parallel pieces of one weight -> the whole weight."""
    if name not in shards[0]:
        return Lazy(label, None, None)
    pieces = [s[name] for s in shards]
    module = name.split(".")[-2]
    dim = META_SPLIT.get(module)
    if dim is None or len(pieces) == 1:  # replicated (norms), or nothing to merge
        if any(p.shape != pieces[0].shape for p in pieces):
            raise ValueError(f"{label}: shards disagree on the shape of a replicated tensor")
        return mapped(label, pieces[0], transform)
    shape = list(pieces[0].shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    if any(p.shape[1 - dim] != shape[1 - dim] for p in pieces):
        raise ValueError(f"{label}: shards disagree on dimension {1 - dim}: {[list(p.shape) for p in pieces]}")
    merge = lambda: torch.cat(pieces, dim)
    return Lazy(label, tuple(shape), (lambda: transform(merge())) if transform else merge)


def read_meta(path: Path):
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth")
    names = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != names:
        raise FileNotFoundError(f"{path}: shards {[f.name for f in files]} are not consolidated.00 .. "
                                f"{len(files) - 1:02d}: a shard is missing or misnamed")
    shards = [torch_load(f) for f in files]
    where = f"{path}/consolidated.*.pth" if len(files) > 1 else files[0]
    rope_freqs = [s.pop("rope.freqs", None) for s in shards]  # Meta's saved RoPE table: recomputed, but checked
    if any(set(s) != set(shards[0]) for s in shards):
        raise ValueError(f"{path}: the shards hold different tensor names")

    params = json.loads((path / "params.json").read_text())
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{where}: no tok_embeddings.weight: not a Meta LLaMA checkpoint")
    args = meta_args(params, shards[0]["tok_embeddings.weight"].shape[0], path / "params.json")
    check_rope_freqs(rope_freqs[0], args, where)

    tensors = {n: merge_shards(shards, n, f"{n} (in {where})", rope_permutation(n, args)) for n in model_names(args)}
    w1 = tensors["layers.0.feed_forward.w1.weight"]
    if w1.shape is not None and w1.shape[0] != args.ffn_dim:
        raise ValueError(f"{where}: the FFN is {w1.shape[0]} wide, params.json's dim / multiple_of / "
                         f"ffn_dim_multiplier give {args.ffn_dim}: params.json does not belong to these weights")
    unused = sorted(set(shards[0]) - set(model_names(args)))
    return args, tensors, unused


def check_rope_freqs(freqs, args: ModelArgs, where):
    # Meta's checkpoints carry their inverse RoPE frequencies; if they disagree with rope_theta, params.json is wrong
    if freqs is None:
        return
    ours = rope_frequencies(args.head_dim, args.rope_theta)
    if freqs.shape != ours.shape or not torch.allclose(freqs.float(), ours, rtol=1e-2):
        raise ValueError(f"{where}: rope.freqs does not match rope_theta {args.rope_theta} and head_dim "
                         f"{args.head_dim} from params.json")


# ----------------------------------------------------------------------------------------------------- llama2.c

LLAMA2C_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of", "norm_eps",
                "max_seq_len"}


def read_llama2c_pt(path: Path):
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        hint = (" (for a Meta consolidated.NN.pth pass its directory, with params.json)"
                if isinstance(checkpoint, dict) and "tok_embeddings.weight" in checkpoint else "")
        raise ValueError(f"{path}: not a llama2.c train.py checkpoint: no 'model_args' and 'model' entries{hint}")
    model_args = dict(checkpoint["model_args"])
    model_args.pop("dropout", None)  # a training setting; inference has no dropout
    unknown = set(model_args) - LLAMA2C_ARGS
    if unknown:
        raise ValueError(f"{path}: unknown model_args {sorted(unknown)}; refusing to guess what they change")
    args = ModelArgs(**model_args)
    # torch.compile'd models save their weights under _orig_mod.
    stored = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}

    tensors = {n: mapped(f"{n} (in {path})", stored.get(n), rope_permutation(n, args)) for n in model_names(args)}
    embedding, output = stored.get("tok_embeddings.weight"), stored.get("output.weight")
    if embedding is not None and output is not None and embedding.data_ptr() == output.data_ptr() \
            and embedding.shape == output.shape:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]  # llama2.c ties them: keep them one tensor
    unused = sorted(set(stored) - set(model_names(args)))
    return args, tensors, unused


def read_llama2c_bin(path: Path):
    size = path.stat().st_size
    if size < 28:
        raise ValueError(f"{path}: {size} bytes, shorter than the 28-byte llama2.c header: truncated or not a "
                         "llama2.c checkpoint")
    with open(path, "rb") as f:
        header = f.read(28)
    if header[:4] == struct.pack("I", 0x616B3432):
        raise ValueError(f"{path}: a llama2.c version 1/2 .bin (magic 'ak42'); only the legacy v0 format is read: "
                         "re-export with export.py --version 0, or load the train.py .pt checkpoint")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("7i", header)
    shared = vocab_size > 0  # a negative vocab_size flags a separate classifier stored at the end
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 \
            or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: header {struct.unpack('7i', header)} is not a llama2.c model's "
                         "(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)")
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     hidden_dim=hidden_dim, max_seq_len=seq_len)

    # the order of llama2.c's export.py legacy_export: each kind of weight for all layers, then the next kind
    L, kv = n_layers, n_kv_heads * args.head_dim
    layout = [("tok_embeddings", (vocab_size, dim)), ("attention_norm", (L, dim)), ("attention.wq", (L, dim, dim)),
              ("attention.wk", (L, kv, dim)), ("attention.wv", (L, kv, dim)), ("attention.wo", (L, dim, dim)),
              ("ffn_norm", (L, dim)), ("feed_forward.w1", (L, hidden_dim, dim)),
              ("feed_forward.w2", (L, dim, hidden_dim)), ("feed_forward.w3", (L, hidden_dim, dim)),
              ("norm", (dim,)), ("freq_cis_real", (seq_len, args.head_dim // 2)),
              ("freq_cis_imag", (seq_len, args.head_dim // 2))]
    if not shared:
        layout.append(("output", (vocab_size, dim)))
    expected = 28 + 4 * sum(math.prod(shape) for _, shape in layout)
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but its header (dim {dim}, hidden_dim {hidden_dim}, n_layers "
                         f"{n_layers}, n_heads {n_heads}, n_kv_heads {n_kv_heads}, vocab_size {vocab_size}, seq_len "
                         f"{seq_len}, {'shared' if shared else 'separate'} classifier) needs {expected}: "
                         + ("the file is truncated (download or export it again), or not a llama2.c v0 .bin"
                            if size < expected else "not a llama2.c v0 .bin"))

    # the whole file as fp32, memory-mapped; the 7 int32 header words take the first 7 slots
    data = torch.from_file(str(path), shared=False, size=size // 4, dtype=torch.float32)
    pieces, offset = {}, 7
    for name, shape in layout:
        n = math.prod(shape)
        pieces[name] = data[offset:offset + n].view(shape)
        offset += n
    check_rope_tables(pieces["freq_cis_real"], pieces["freq_cis_imag"], args, path)

    stored = {"tok_embeddings.weight": pieces["tok_embeddings"], "norm.weight": pieces["norm"]}
    for i in range(n_layers):
        for module in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                       "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            stored[f"layers.{i}.{module}.weight"] = pieces[module][i]
    stored["output.weight"] = pieces["tok_embeddings"] if shared else pieces["output"]
    tensors = {n: mapped(f"{n} (in {path})", stored[n], rope_permutation(n, args)) for n in model_names(args)}
    if shared:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    return args, tensors, []


def check_rope_tables(real, imag, args: ModelArgs, where):
    # the .bin ends with the RoPE tables at theta 10000; finding them where the layout says is a check of the reading
    inv_freq = rope_frequencies(args.head_dim, 10000.0)
    angles = torch.outer(torch.arange(real.shape[0]).float(), inv_freq)
    if not (torch.allclose(real, angles.cos(), atol=1e-3) and torch.allclose(imag, angles.sin(), atol=1e-3)):
        raise ValueError(f"{where}: the RoPE tables are not where the header's shapes put them, or not at theta "
                         "10000: the file is not a llama2.c v0 .bin this loader understands")
