# python -m para_mini.equivalence --weights DIR: does para_mini compute what Hugging Face transformers computes?
#
# Both implementations are loaded from the same Hugging Face checkpoint directory and given the same prompts (a
# left-padded batch). The report gives, for every block, the max |diff| of its output hidden state two ways:
#   same input  both blocks given the hidden state para_mini carried into that block: where a difference starts
#   carried     each implementation's own hidden state, as it runs: how a difference grows
# then the logits' max |diff| and top-1 agreement over the prompts, the greedy continuations of both side by side,
# and a verdict (exit 0: the same, or within --atol with the same greedy tokens; exit 1: they differ).
#
# Streaming, so that a 7B checkpoint in fp32 fits beside its own reference on a 24 GiB machine: both models are
# built with their embeddings, final norm and head, and blocks that hold no weights (stand-ins of the right shape
# that cost no memory and are NaN if ever used). A forward pre-hook reads a block's weights from the checkpoint just
# before it runs, a forward hook puts the stand-ins back after, so memory holds one block at a time besides the two
# models' embeddings and heads. The two read the files independently: para_mini through its loader
# (loading.read_checkpoint, our names), Hugging Face's side by the names in its own module tree. Everything else is
# each library's own code: Transformer.forward, and LlamaForCausalLM.forward with its rotary embedding and causal
# mask. The greedy continuations run the growing sequences through the whole model again for every new token,
# without a cache (each pass reads every block again).
#
# With --adapter: a LoRA or (IA)^3 adapter is attached to ours with load_adapter and to Hugging Face's model with
# PEFT (from the adapter written in PEFT's format, or the PEFT directory given); a PARA adapter to Hugging Face's
# model through forward hooks that compute the paper's equations loop by loop (vg_reference below, which the tests
# use too), independently of model.py's VectorGenerator.
#
# transformers (and peft, for LoRA / (IA)^3 adapters) are imported inside the functions that need them: the
# package runs without them, and this command says how to install them.
import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .adapters import LINEARS, load_adapter, read_adapter
from .loading import HF_NAMES, check_tensors, read_checkpoint
from .model import ModelArgs, Transformer, site_dims
from .tokenizer import find_tokenizer, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# --atol's defaults, the logits' max |diff| that passes: where the two round in different places (on a GPU; with an
# adapter, whose term PEFT adds in fp32) bf16's 8-bit mantissa gives steps of 0.06 at logits of 8 to 16
ATOL = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 0.25, "bf16": 1.0}
PROMPTS = ["Once upon a time,", "The capital of France is", "def fibonacci(n):"]  # with a tokenizer
INSTALL = ("python -m para_mini.equivalence compares para_mini with Hugging Face {what}, which is not installed: "
           "pip install transformers peft (or, in a checkout, pip install -e \".[test]\")")


# ------------------------------------------------------------------------------------- the paper, loop by loop
# PARA's vector generator transcribed from the paper one prompt at a time, as independent of model.py as it can be:
# Eq. (6) for the projections, Eq. (7)-(10) for the capsule pooler with the squash exactly as the paper writes it.

def gelu(x):  # the exact (erf) GeLU, docs/design.md decision 5
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def capsule_pool_reference(hp, W, v):
    """Eq. (7)-(10) for one prompt: hp = h' of its tokens [T_ins, r], W = W^cap [K, r, r/K], v = v_k [K, r] (None:
    PARADE-2's zero initial logits) -> [r]."""
    T, K = hp.shape[0], W.shape[0]
    m = [[hp[j] @ W[k] for k in range(K)] for j in range(T)]  # Eq. (7)
    logit = [[(v[k] @ hp[j]).item() if v is not None else 0.0 for k in range(K)] for j in range(T)]  # Eq. (9)

    def capsules(logit):
        out = []
        for k in range(K):
            e = [math.exp(logit[j][k]) for j in range(T)]
            n = [x / sum(e) for x in e]  # softmax over j
            s = sum(n[j] * m[j][k] for j in range(T))  # Eq. (8)
            norm2 = (s @ s).item()
            out.append(norm2 / (1 + norm2) * s / math.sqrt(norm2))  # the squash exactly as the paper writes it
        return out

    c = capsules(logit)
    logit = [[logit[j][k] + (c[k] @ m[j][k]).item() for k in range(K)] for j in range(T)]  # Eq. (10)
    return torch.cat(capsules(logit))


def vg_reference(h_prompt, t, prefix, cfg, args):
    """Eq. (3), (6) for one layer and one prompt: h_prompt [T_ins, dim]; t maps the layer's file tensor names
    (prefix + ".down.weight", ...) to tensors -> {target: its vector}."""
    hp = h_prompt @ t[prefix + ".down.weight"].T
    if cfg.pooler == "last":
        z = hp[-1]
    elif cfg.pooler == "mean":
        z = sum(hp[j] for j in range(hp.shape[0])) / hp.shape[0]
    else:
        z = capsule_pool_reference(hp, t[prefix + ".pool.weight"],
                                   t[prefix + ".pool.query"] if cfg.pooler == "capsule" else None)
    l = gelu(z) @ t[prefix + ".up.weight"].T + t[prefix + ".up.bias"]
    sizes = [site_dims(args)[s][1] for s in cfg.targets]
    return dict(zip(cfg.targets, l.split(sizes)))


def hf_with_para_hooks(hf, tensors, cfg, prompt_lens, pad=None):
    """Hugging Face's LlamaForCausalLM with PARA applied through forward hooks: in every layer, the vectors of each
    row's prompt (prompt_lens[b] tokens after pad[b] of left padding) from the attention RMSNorm's output
    (docs/design.md decision 1), scaling the targets' outputs (Eq. 4, 5). Computed afresh at every forward: no
    cache. -> the hooks' handles."""
    c = hf.config
    args = ModelArgs(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size)
    pad = [0] * len(prompt_lens) if pad is None else [int(p) for p in pad]
    handles, vectors = [], {}
    for i, layer in enumerate(hf.model.layers):
        t = {k[len(f"layers.{i}"):]: v for k, v in tensors.items() if k.startswith(f"layers.{i}.")}

        def make_vectors(mod, inp, out, i=i, t=t):  # in the adapter's dtype, used in the activations'
            rows = [vg_reference(out[b, p:p + int(n)].to(t[".vg.down.weight"].dtype), t, ".vg", cfg, args)
                    for b, (p, n) in enumerate(zip(pad, prompt_lens))]
            vectors[i] = {s: torch.stack([r[s] for r in rows])[:, None].to(out.dtype) for s in cfg.targets}

        handles.append(layer.input_layernorm.register_forward_hook(make_vectors))
        for site in cfg.targets:
            scale = lambda mod, inp, out, i=i, site=site: out * vectors[i][site]  # Eq. (4), (5)
            handles.append(layer.get_submodule(HF_NAMES[LINEARS[site]]).register_forward_hook(scale))
    return handles


# ------------------------------------------------------------------------------------------------- streaming

def stand_in(shape, dtype):
    # a tensor of the right shape and dtype that holds one element: NaN everywhere, should it ever be computed with
    return torch.full((), float("nan"), dtype=dtype).expand(shape)


def put(module, name, tensor):
    """Set the parameter `name` (e.g. self_attn.q_proj.weight) of module to tensor."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path)
    owner = getattr(owner, "base_layer", owner)  # PEFT wraps the projections it adapts: the weight is its base's
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))


class Streamed:
    """Blocks that hold their weights only while they run: read(i) -> {name in block i: tensor} is called by a
    forward pre-hook, and the stand-ins go back after the forward. While `recording`, each block's input and output
    are kept, and the block is also run on `other[i]` (the other implementation's input to it) into same[i]."""

    def __init__(self, blocks, read):
        self.read, self.recording, self.other = read, False, None
        self.inputs, self.outputs, self.same = {}, {}, {}
        self.stand_ins = {}  # name -> its stand-in, for the weights a block was given
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self.load, i), with_kwargs=True)
            block.register_forward_hook(partial(self.unload, i))

    def load(self, i, block, args, kwargs):
        for name, t in self.read(i).items():
            put(block, name, t)
            self.stand_ins[name] = stand_in(t.shape, t.dtype)
        if self.recording:
            self.inputs[i] = args[0]
            if self.other is not None:  # block.forward, not block(): these hooks must not run again
                self.same[i] = block.forward(self.other[i], *args[1:], **kwargs)

    def unload(self, i, block, args, output):
        if self.recording:
            self.outputs[i] = output
        for name, t in self.stand_ins.items():
            put(block, name, t)


def read_ours(path, dtype, i):
    # opened afresh for each block: safetensors maps its files into memory, and the pages read through a map stay
    # resident (and counted as this process's memory) until the map is closed, here when the block's tensors are read
    _, tensors, _ = read_checkpoint(Path(path))
    prefix = f"layers.{i}."
    return {name[len(prefix):]: t.read().to(dtype) for name, t in tensors.items() if name.startswith(prefix)}


def ours_streamed(path, dtype, adapter=None):
    """para_mini's Transformer from the checkpoint, its blocks streamed (Streamed)."""
    args, tensors, unused = read_checkpoint(Path(path))
    with torch.device("meta"):
        model = Transformer(args)
    check_tensors(path, tensors, {n: tuple(t.shape) for n, t in model.state_dict().items()}, unused)
    for name, t in model.state_dict().items():
        put(model, name, stand_in(t.shape, dtype) if name.startswith("layers.") else tensors[name].read().to(dtype))
    if tensors["output.weight"] is tensors["tok_embeddings.weight"]:  # tied, as load_model keeps them
        model.output.weight = model.tok_embeddings.weight
    model.eval()
    if adapter is not None:
        load_adapter(model, adapter, other_base=True)  # the digest needs the block weights, streamed in later
    return model, Streamed(model.layers, partial(read_ours, path, dtype))


def hf_files(path: Path) -> dict:
    """{tensor name: the safetensors file that holds it} of a Hugging Face checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: path / "model.safetensors" for name in f.keys()}


def hf_tensor(file, name, dtype):
    with safe_open(str(file), framework="pt") as f:  # closed at once (read_ours says why)
        return f.get_tensor(name).to(dtype)


def read_hf(files, dtype, i):
    prefix = f"model.layers.{i}."
    return {name[len(prefix):]: hf_tensor(file, name, dtype) for name, file in files.items()
            if name.startswith(prefix)}


def hf_streamed(path, dtype, adapter=None, prompt_lens=None, pad=None):
    """transformers' LlamaForCausalLM from the checkpoint as from_pretrained(path, dtype=dtype) makes it (sdpa
    attention, RoPE's frequencies in fp32), its blocks streamed, with the adapter attached by PEFT or PARA's hooks.
    -> (the model to call, Streamed)."""
    import transformers
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    config.dtype = dtype
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    files, names = hf_files(path), dict(hf.state_dict())
    tied = config.tie_word_embeddings
    missing = [n for n in names if n not in files and not (tied and n == "lm_head.weight")]
    unused = [n for n in files if n not in names and not n.endswith("rotary_emb.inv_freq")]
    if missing or unused:
        raise ValueError(f"{path}: transformers' LlamaForCausalLM finds tensors missing {missing[:5]} and "
                         f"unexpected {unused[:5]}")
    for name, t in names.items():
        if not (tied and name == "lm_head.weight"):
            put(hf, name, stand_in(t.shape, dtype) if name.startswith("model.layers.") else
                hf_tensor(files[name], name, dtype))
    if tied:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config)  # its buffers, made as from_pretrained makes them
    hf.eval()
    streamed = Streamed(hf.model.layers, partial(read_hf, files, dtype))
    if adapter is None:
        return hf, streamed
    cfg, _, tensors = read_adapter(adapter)
    if cfg.method == "para":
        hf_with_para_hooks(hf, tensors, cfg, prompt_lens, pad)
        return hf, streamed
    try:
        import peft
    except ImportError:
        raise SystemExit(INSTALL.format(what="peft (the reference for LoRA and (IA)^3 adapters)")) from None
    if Path(adapter).is_dir():
        return peft.PeftModel.from_pretrained(hf, adapter).eval(), streamed
    with tempfile.TemporaryDirectory() as tmp:  # ours, written as PEFT writes it (peft_format.py)
        from .peft_format import write_peft
        write_peft(tmp, cfg, tensors)
        return peft.PeftModel.from_pretrained(hf, tmp).eval(), streamed


# ---------------------------------------------------------------------------------------------- the comparison

@dataclass
class Report:
    embeddings: float  # max |diff| of the two models' embedding outputs
    same_input: list  # per block: max |diff| of the outputs given para_mini's input to it
    carried: list  # per block: max |diff| of the outputs, each model on its own hidden state
    logits: float
    top1: tuple  # (positions where the two argmaxes agree, positions)
    ours: list = field(default_factory=list)  # each prompt's greedy continuation, token ids
    theirs: list = field(default_factory=list)

    def first_difference(self):
        return next((i for i, d in enumerate(self.same_input) if d != 0), None)

    def exact(self) -> bool:
        return (self.embeddings == 0 and self.logits == 0 and not any(self.same_input) and not any(self.carried)
                and self.ours == self.theirs)


def max_diff(a, b, real) -> float:
    return (a[real].double() - b[real].double()).abs().max().item()


def left_padded(prompts):
    """token ids [B, T] with id 0 at each row's left padding, pad [B] (None: no padding), attention mask [B, T]."""
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    return tokens, (pad if pad.any() else None), (torch.arange(T)[None] >= pad[:, None]).long()


@torch.no_grad()
def compare(weights, prompts, dtype=torch.float32, adapter=None, new_tokens=16, show=None) -> Report:
    """Run the prompts (lists of token ids) through both implementations; show(line) hears each step."""
    show = show or (lambda line: None)
    tokens, pad, attention_mask = left_padded(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts])
    ours, ours_blocks = ours_streamed(weights, dtype, adapter)
    hf, hf_blocks = hf_streamed(weights, dtype, adapter, prompt_lens, pad)

    def run_ours(tokens, last):
        return ours(tokens, prompt_lens=prompt_lens, pad=pad, logits_at=slice(-1, None) if last else None)

    def run_hf(tokens, last):
        mask = torch.cat([attention_mask, torch.ones(len(prompts), tokens.shape[1] - attention_mask.shape[1],
                                                     dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate()'s, counted from the first real token
        return hf(input_ids=tokens, attention_mask=mask if pad is not None else None, position_ids=positions,
                  use_cache=False, logits_to_keep=1 if last else 0).logits

    # the prompts, every block's input and output kept; Hugging Face's blocks also run on para_mini's inputs
    t0 = time.time()
    ours_blocks.recording = hf_blocks.recording = True
    ours_logits = run_ours(tokens, last=False)
    show(f"para_mini: the prompts through {len(ours.layers)} blocks ({time.time() - t0:.0f} s)")
    t0, hf_blocks.other = time.time(), ours_blocks.inputs
    hf_logits = run_hf(tokens, last=False)
    show(f"transformers: the same, and each block on para_mini's input too ({time.time() - t0:.0f} s)")
    ours_blocks.recording = hf_blocks.recording = False
    real = attention_mask.bool()
    n = len(ours.layers)
    report = Report(
        embeddings=max_diff(ours_blocks.inputs[0], hf_blocks.inputs[0], real),
        same_input=[max_diff(ours_blocks.outputs[i], hf_blocks.same[i], real) for i in range(n)],
        carried=[max_diff(ours_blocks.outputs[i], hf_blocks.outputs[i], real) for i in range(n)],
        logits=max_diff(ours_logits, hf_logits, real),
        top1=(int((ours_logits.argmax(-1) == hf_logits.argmax(-1))[real].sum()), int(real.sum())))

    # greedy: each implementation continues its own sequences, one whole pass per new token
    seqs = {"ours": tokens, "hf": tokens}
    last = {"ours": ours_logits[:, -1], "hf": hf_logits[:, -1]}
    for step in range(new_tokens):
        t0 = time.time()
        for who, run in (("ours", run_ours), ("hf", run_hf)):
            if step:
                last[who] = run(seqs[who], last=True)[:, -1]
            seqs[who] = torch.cat([seqs[who], last[who].argmax(-1, keepdim=True)], 1)
        if step:
            show(f"greedy token {step + 1} / {new_tokens} ({time.time() - t0:.0f} s)")
    report.ours, report.theirs = seqs["ours"][:, tokens.shape[1]:].tolist(), seqs["hf"][:, tokens.shape[1]:].tolist()
    return report


def fmt(x: float) -> str:
    return "0.0" if x == 0 else f"{x:.3g}"


def print_report(report: Report, prompts, tok, atol: float) -> bool:
    """Print the report and its verdict; -> whether the two agree (the same, or within atol)."""
    print(f"\n{'block':>8}  {'same input':>12}  {'carried':>12}")
    print(f"{'embed':>8}  {'':>12}  {fmt(report.embeddings):>12}")
    for i, (same, carried) in enumerate(zip(report.same_input, report.carried)):
        print(f"{i:>8}  {fmt(same):>12}  {fmt(carried):>12}")
    agree, total = report.top1
    print(f"\nlogits: max |diff| {fmt(report.logits)}, top-1 agreement {agree} / {total} positions")
    show = (lambda ids: repr(tok.decode(ids))) if tok is not None else str
    print(f"\ngreedy, {len(report.ours[0])} new tokens:")
    for p, ours, theirs in zip(prompts, report.ours, report.theirs):
        print(f"  prompt {show(p)}" + ("" if ours == theirs else "   <- the continuations differ"))
        print(f"    para_mini:    {show(ours)}\n    transformers: {show(theirs)}")
    first, same_tokens = report.first_difference(), report.ours == report.theirs
    where = "" if first is None else f"; given the same input, block {first} is the first whose output differs"
    if report.exact():
        print("\nverdict: the same, bit for bit: every block's output, every logit and every greedy token")
        return True
    if report.logits <= atol and same_tokens:
        print(f"\nverdict: close: logits within {atol:g} (--atol) and the same greedy tokens, not bit for bit{where}")
        return True
    print(f"\nverdict: DIFFERENT: logits differ by {fmt(report.logits)} (--atol {atol:g})"
          + ("" if same_tokens else ", the greedy continuations differ") + where)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compare para_mini with Hugging Face transformers on a Hugging Face "
                                "checkpoint, block by block (streamed: one block in memory at a time).")
    p.add_argument("--weights", required=True, help="a Hugging Face checkpoint directory (config.json, safetensors)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: three built in)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one beside the weights; without one, the "
                   "built-in prompts are token ids and --prompt cannot be used)")
    p.add_argument("--adapter", help="a para-mini adapter file (PARA, LoRA, (IA)^3) or a PEFT adapter directory")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    p.add_argument("--atol", type=float, help="the logits' max |diff| that still passes (default by dtype: "
                   + ", ".join(f"{k} {v:g}" for k, v in ATOL.items()) + ")")
    a = p.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print(INSTALL.format(what="transformers (the reference)"), file=sys.stderr)
        return 2
    weights = Path(a.weights)
    try:
        if not (weights / "config.json").is_file():
            raise ValueError(f"{weights}: not a Hugging Face checkpoint directory (config.json and safetensors), "
                             "which both implementations read")
        vocab_size = read_checkpoint(weights)[0].vocab_size
        tok = None
        if a.tokenizer or (weights / "tokenizer.model").is_file():
            tok = load_tokenizer(a.tokenizer or find_tokenizer(weights))
            if tok.vocab_size != vocab_size:
                raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model {vocab_size}: pass the "
                                 "checkpoint's own --tokenizer")
        if a.prompt and tok is None:
            raise ValueError("--prompt needs a tokenizer: pass --tokenizer")
        if tok is not None:
            prompts = [tok.encode(text, bos=True) for text in a.prompt or PROMPTS]
        else:  # three prompts of fixed random ids after BOS (1), of different lengths
            g = torch.Generator().manual_seed(0)
            prompts = [[1] + torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in (8, 13, 5)]
        print(f"para_mini and transformers {transformers.__version__} on {weights} in {a.dtype}, {len(prompts)} "
              f"prompts of {[len(q) for q in prompts]} tokens" + (f", adapter {a.adapter}" if a.adapter else ""),
              flush=True)
        report = compare(weights, prompts, DTYPES[a.dtype], a.adapter, a.new_tokens,
                         show=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if print_report(report, prompts, tok, ATOL[a.dtype] if a.atol is None else a.atol) else 1


if __name__ == "__main__":
    sys.exit(main())
