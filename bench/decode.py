# python bench/decode.py: decoding speed of the base model, PARA, (IA)^3 and LoRA with para-mini's KV cache, in
# the paper's Table 4 setting (one 274-token prompt, 32 new tokens, beam 1 and 3) and in mixed-tenant batches
# (every request with its own adapter), beside Hugging Face transformers + PEFT on the very same weight tensors
# when those are installed, so the ratios are measured side by side. Weights are random: nothing is downloaded.
# Our rows come twice: the eager decoding step and the fast one (a CUDA graph on a GPU), and the report ends with
# the goals 1-5 of a GPU run, each a ratio of two figures of the same run.
#
# The setup of each side, so that a ratio compares like with like or says that it does not: attention is
# F.scaled_dot_product_attention on both sides (HF's attn_implementation="sdpa") with cuDNN's attention turned off
# in both (same_attention below; bench/env.py lists the kernel each shape gets); Hugging Face generates eagerly
# with its dynamic cache, so our eager rows over its rows are eager over eager, and our fast rows (a CUDA graph)
# over its rows are labelled as such; PEFT computes its adapters in fp32 by default (autocast_adapter_dtype=True),
# casting at every adapted layer, while ours run in the model's dtype: PEFT's batch-1 rows are measured both ways.
import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

# bench/ is not part of the package: run as a script, it imports the para_mini of the checkout it sits in, installed
# or not (the repository root first on the path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from para_mini.adapters import LINEARS, AdapterConfig  # noqa: E402
from para_mini.generation import Request, beam_search, generate  # noqa: E402
from para_mini.loading import HF_NAMES  # noqa: E402
from para_mini.model import ModelArgs, Transformer  # noqa: E402
from para_mini.serving import Tenants  # noqa: E402

SHAPES = {
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=344,
                      max_seq_len=512),
    "7b": ModelArgs(max_seq_len=4096),  # LLaMA-2 7B
}
METHODS = {  # the settings of the paper's Table 4
    "base": None,
    "para": AdapterConfig("para", ("q", "v", "u"), r=12, K=4),
    "ia3": AdapterConfig("ia3", ("k", "v", "u")),  # u: the same as PEFT's scaling of down_proj's input
    "lora": AdapterConfig("lora", r=4, alpha=8),  # all seven linears, unmerged
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Datasheet figures of the GPUs these benchmarks expect, by the name torch.cuda.get_device_name() gives (matched in
# this order, ignoring case: "NVIDIA H100 80GB HBM3" is the SXM card): dense bf16 tensor-core FLOP/s, memory bytes/s
GPUS = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200 NVL", 835e12, 4.8e12),
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),
)
DEFINITIONS = {
    "tokens_per_s": "new tokens generated per second per whole batch: batch size x new tokens / median wall time of "
                    "the whole generate call, prefill included; beam search counts the returned sequence's tokens, "
                    "not every beam's",
    "decode_tokens_per_s": "the same without the prefill: batch x (new tokens - 1) / (total time - ttft)",
    "ttft_s": "time to first token: median wall time of the same call with max_new_tokens=1 (prefill of the whole "
              "batch + choosing the first token)",
    "warmup_s": "the untimed first call of the whole generate: on the fast path it includes capturing the CUDA "
                "graph (and with --compile, compiling the step)",
    "peak_mem_mib": "torch.cuda.max_memory_allocated over the timed calls, weights included: what live tensors "
                    "hold at the worst moment (null on CPU: see cpu_rss_peak_mib for the whole process)",
    "peak_mem_reserved_mib": "torch.cuda.max_memory_reserved over the same calls: what the caching allocator held "
                             "from the GPU, CUDA graphs' private memory pools included (those are reserved, not "
                             "allocated). Before every row the previous row's decoding state is freed, garbage "
                             "collected and its cached blocks given back, so each row counts its own memory only",
    "floor_tokens_per_s": "every weight GEMV of one token (batch 1: x @ W.T for all layers' seven linears and the "
                          "LM head) replayed from a CUDA graph: the practical floor of batch-1 decoding",
    "roofline": "weight_bytes: the bytes those GEMVs read per token; hbm_roofline_tokens_per_s: the GPU's datasheet "
                "memory bandwidth (by the device name read at run time) / weight_bytes, the bound no batch-1 "
                "decoder can pass; floor_over_roofline and fast_base_over_roofline: how near the GEMV floor and our "
                "fast batch-1 base decode come to it",
    "path": "eager: model.py's decoding step (the default); fast: the same step with the KV cache in its static mode "
            "(whole buffers read, every shape fixed), after the same eager prefill, replayed from a CUDA graph on a "
            "GPU (torch.compile'd first with --compile), run as it is on a CPU; Hugging Face's rows are its eager "
            "generate with its dynamic cache",
    "attention": "F.scaled_dot_product_attention on both sides (Hugging Face with attn_implementation='sdpa'), with "
                 "cuDNN's attention backend turned off in both (torch.backends.cuda.enable_cudnn_sdp(False)): the "
                 "flash or memory-efficient kernels, the same for the same shapes; python bench/env.py lists the "
                 "backend each of our and Hugging Face's shapes gets",
    "adapter_compute_dtype": "the dtype the adapters' products run in at each decoding step. Ours: the model's; "
                             "their weights are kept in fp32 and cast once, at the prefill. PEFT's default "
                             "(autocast_adapter_dtype=True): fp32 on a bf16 model, the activations cast to fp32 and "
                             "back at every adapted layer; PEFT's batch-1, beam-1 rows are also measured with "
                             "autocast_adapter_dtype=False (bf16). The ratios and goals use PEFT's default",
    "ratios": "para-mini's tokens/s over Hugging Face's for the same method and setting (PEFT's default adapters; "
              "_bf16_adapters: over the row with PEFT's adapters in bf16); PARA, which PEFT does not have, over HF's "
              "base, LoRA and (IA)^3; compares says which paths each ratio sets side by side",
    "targets": "the goals 1-5 of a GPU run, each the ratio of two figures of this run, so that a goal holds on any "
               "GPU (an H100 or an H200 alike); met is null where a figure is missing (no GPU: no floor; no Hugging "
               "Face)",
    "timed_calls": "how many calls each median is of (settings.repeats, or fewer under --max-timed-s), after "
                   "settings.warmup untimed ones",
    "complete": "false while the run is going on (or where it was stopped): results holds the rows measured so far",
}


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_specs(name: str) -> dict:
    """A device's name, as read at run time, with its datasheet bf16 peak and memory bandwidth (null if unlisted)."""
    flops, bandwidth = next(((f, b) for key, f, b in GPUS if key.lower() in name.lower()), (None, None))
    return {"name": name, "peak_bf16_flops": flops, "hbm_bytes_per_s": bandwidth}


def versions() -> dict:
    """The versions every report carries, whatever step it comes from (cuDNN: null without CUDA)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    return out | {name: sys.modules[name].__version__ for name in ("transformers", "peft") if name in sys.modules}


def same_attention():
    """Take cuDNN out of SDPA's choices, in this process, for our model and Hugging Face's alike: recent torch may
    route bf16 attention on Hopper to cuDNN, which plans per shape (eager decoding would plan at every KV length)
    and is the least tried with an additive mask under CUDA-graph capture. Flash and memory-efficient remain."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_missing(device) -> Optional[str]:
    """What torch.compile lacks on this machine to build its kernels (None: nothing). Inductor compiles them at
    their first call, with a C compiler for Triton's launchers on a GPU, a C++ one on a CPU, against Python.h."""
    if device.type == "cuda":
        missing = [] if importlib.util.find_spec("triton") else ["triton"]
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            missing.append("a C compiler for Triton (gcc, clang, or one named by CC)")
    else:
        missing = [] if os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") else [
            "a C++ compiler for Inductor's CPU kernels (g++, clang++, or one named by CXX)"]
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        missing.append(f"Python.h (not in {include}: the Python development headers)")
    return "; ".join(missing) or None


def random_model(args: ModelArgs, dtype, device, seed=0) -> Transformer:
    """Random weights made directly on the device in their final dtype (a 7B model never exists in fp32)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def attach(tenants: Tenants, cfg, n, seed=0):
    """n tenants of one adapter setting, with random non-trivial weights (at initialisation they are identities)."""
    names = [f"{cfg.method}{i}" for i in range(n)]
    g = torch.Generator(tenants.model.output.weight.device).manual_seed(seed)
    for name in names:
        tenants.add(name, cfg)
        with torch.no_grad():
            for p in tenants.state(name).values():
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.02)
    return names


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device, warmup, repeats, max_s=None):
    """(median wall time of `repeats` calls after `warmup` untimed ones, the number of timed calls, the last warm-up
    call's time). max_s: where the last warm-up call says that `repeats` calls would take longer than max_s seconds,
    time fewer (at least one), so that a few very slow rows (PEFT's mixed-adapter batch on a GPU) do not take most
    of a short run."""
    warm = [seconds(fn, device) for _ in range(warmup)]
    if max_s and warm:
        repeats = max(1, min(repeats, int(max_s // warm[-1])))
    return statistics.median(seconds(fn, device) for _ in range(repeats)), repeats, warm[-1] if warm else None


def fresh(model, device):
    """Before a row: free what earlier rows left (our captured decoding step, with its static KV cache and CUDA graph,
    kept on the model for the next call of the same shape; PEFT's adapter layers), collect what only a reference cycle
    still holds, and give the cached blocks back, so that the row's peak counters see its own memory only."""
    model.decode_step = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(run, batch, new_tokens, device, s):
    """run(n) generates n tokens for every request of the batch."""
    ttft, n_ttft, _ = timed(lambda: run(1), device, s["warmup"], s["repeats"], s["max_timed_s"])
    if device.type == "cuda":  # the peaks of the whole calls only, from what they reserve themselves
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    total, n_total, warm = timed(lambda: run(new_tokens), device, s["warmup"], s["repeats"], s["max_timed_s"])
    cuda = device.type == "cuda"
    return {"tokens_per_s": batch * new_tokens / total,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (total - ttft) if total > ttft else None,  # noise
            "ttft_s": ttft, "total_s": total, "warmup_s": warm, "timed_calls": {"ttft": n_ttft, "total": n_total},
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_mem_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None}


def prompts(vocab, prompt_len, n, seed=0):
    """n random prompts; in a batch of several their lengths differ (down to half), so rows are left-padded."""
    g = torch.Generator().manual_seed(seed)
    lens = [prompt_len - (i * 37) % max(prompt_len // 2, 1) for i in range(n)]
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lens]


# ---------------------------------------------------------------------------------------------------- ours

def bench_ours(model, s, device, save):
    """Every para-mini row, each handed to save() as soon as it is measured."""
    for fast in (False, True):  # warm-up
        generate(model, [Request(p, None, 4) for p in prompts(model.args.vocab_size, s["prompt_len"], 2)], fast=fast)
    tenants = Tenants(model)
    for method in s["methods"]:
        cfg = METHODS[method]
        names = attach(tenants, cfg, max(s["mixed"], default=1)) if cfg else []
        dtype = str(model.output.weight.dtype).removeprefix("torch.") if cfg else None  # vectors cast at prefill
        for batch, beam in [(1, b) for b in s["beams"]] + [(n, 1) for n in s["mixed"]]:
            ps = prompts(model.args.vocab_size, s["prompt_len"], batch)
            adapters = names[:batch] if cfg else [None] * batch
            for path in ("eager", "fast"):
                opts = {"fast": path == "fast", "compile": path == "fast" and s["compile"], "batch_size": batch,
                        "tenants": tenants}

                def run(n):
                    requests = [Request(p, a, n) for p, a in zip(ps, adapters)]
                    if beam == 1:
                        generate(model, requests, **opts)
                    else:
                        beam_search(model, requests, beam=beam, **opts)

                row = {"impl": "para-mini", "path": path, "method": method, "batch": batch, "beam": beam,
                       "tenants": len(set(adapters) - {None}), "adapter_compute_dtype": dtype}
                fresh(model, device)
                save(row | measure(run, batch, s["new_tokens"], device, s))
        for name in names:
            tenants.remove(name)
    fresh(model, device)  # for Hugging Face's rows


# ------------------------------------------------------------------------------- Hugging Face + PEFT, optional

def hf_missing():
    """Why transformers and peft cannot be imported, or None: the side-by-side rows are optional."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def hf_twin(model):
    """A Hugging Face LlamaForCausalLM whose parameters are the very tensors of `model` (no copy)."""
    import transformers
    a, w = model.args, model.output.weight
    cfg = transformers.LlamaConfig(
        hidden_size=a.dim, intermediate_size=a.ffn_dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_seq_len, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=0, attn_implementation="sdpa")
    with torch.device(w.device):
        hf = transformers.LlamaForCausalLM._from_config(cfg, dtype=w.dtype)
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        for ours, theirs in HF_NAMES.items():
            state[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    hf.load_state_dict(state, strict=True, assign=True)
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens, as for para-mini (eos_id=None)
    return hf.eval().requires_grad_(False)


def hf_inputs(ps, device):
    T = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), T, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(ps):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def bench_hf(model, s, device, save):
    """Every Hugging Face + PEFT row, each handed to save() as soon as it is measured (the slowest last)."""
    import peft
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside PEFT
    hf = hf_twin(model)
    sites = list(HF_NAMES.values())[:7]
    peft_configs = {
        "base": None,
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "lora": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[x.split(".")[1] for x in sites]),
    }
    # (method, PEFT's autocast_adapter_dtype): its default, True, keeps adapters in fp32 on a bf16 model; the other
    # way (adapters in the model's dtype, as ours) at batch 1, beam 1 only, before LoRA's slow mixed batch
    runs = [("base", True), ("ia3", True)]
    if model.output.weight.dtype != torch.float32:  # on an fp32 model both ways are the same
        runs += [("ia3", False), ("lora", False)]
    runs.append(("lora", True))
    for method, autocast_adapters in ((m, a) for m, a in runs if m in s["methods"]):
        cfg = peft_configs[method]
        # PEFT mixes adapters in one batch (adapter_names=) for LoRA only
        tenants = max(s["mixed"], default=1) if method == "lora" and autocast_adapters else 1
        m, dtype = hf, None
        fresh(model, device)
        if cfg is not None:
            m = peft.get_peft_model(hf, cfg, adapter_name=f"{method}0", autocast_adapter_dtype=autocast_adapters)
            for i in range(1, tenants):
                m.add_adapter(f"{method}{i}", cfg)
            m.set_adapter(f"{method}0")
            g = torch.Generator(device).manual_seed(0)
            with torch.no_grad():  # B of LoRA starts at zero, (IA)^3's vectors at one
                for n, p in m.named_parameters():
                    if "lora_B" in n or "ia3_l" in n:
                        p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.02)
                        dtype = str(p.dtype).removeprefix("torch.")
            m.eval()
        settings = [(1, b) for b in s["beams"]] + ([(n, 1) for n in s["mixed"]] if method != "ia3" else [])
        if not autocast_adapters:
            settings = [(1, 1)] if 1 in s["beams"] else []
        for batch, beam in settings:
            ids, mask = hf_inputs(prompts(model.args.vocab_size, s["prompt_len"], batch), device)
            extra = {"adapter_names": [f"lora{i}" for i in range(batch)]} if method == "lora" and batch > 1 else {}

            def run(n):
                m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, num_beams=beam,
                           do_sample=False, pad_token_id=0, **extra)

            row = {"impl": "hf", "path": "eager", "method": method, "batch": batch, "beam": beam,
                   "tenants": len(extra.get("adapter_names", [])) or int(cfg is not None),
                   "adapter_compute_dtype": dtype}
            save(row | measure(run, batch, s["new_tokens"], device, s))
        if cfg is not None:
            hf = m.unload()  # take the adapter layers out again: the next method starts from the plain model
            del m


def peft_default(row):
    """A Hugging Face row as PEFT runs by default: adapters in fp32 whatever the model's dtype (or no adapter)."""
    return row["adapter_compute_dtype"] in (None, "float32")


def ratios(rows):
    """para-mini's tokens/s over Hugging Face's for the same method and setting; PARA, which PEFT does not have,
    over HF's base, LoRA and (IA)^3 (the paper's comparison)."""
    hf = {(r["method"], r["batch"], r["beam"], peft_default(r)): r["tokens_per_s"] for r in rows if r["impl"] == "hf"}
    out = []
    for r in rows:
        if r["impl"] != "para-mini":
            continue
        others = ("base", "lora", "ia3") if r["method"] == "para" else (r["method"],)
        entry = {"path": r["path"], "method": r["method"], "batch": r["batch"], "beam": r["beam"],
                 "compares": "para-mini eager over Hugging Face eager (dynamic cache)" if r["path"] == "eager" else
                 "para-mini fast (a CUDA graph on a GPU) over Hugging Face eager (dynamic cache)"}
        for other in others:
            theirs = hf.get((other, r["batch"], r["beam"], True))
            entry[f"over_hf_{other}"] = r["tokens_per_s"] / theirs if theirs else None
            theirs = hf.get((other, r["batch"], r["beam"], False))
            if theirs:
                entry[f"over_hf_{other}_bf16_adapters"] = r["tokens_per_s"] / theirs
        out.append(entry)
    return out


def targets(rows, floor, n):
    """The goals 1-5 of a GPU run, each a ratio of two figures of this run; n: the mixed batch (8 in the full run;
    None where the run has none). Hugging Face's rows: PEFT's default setup."""
    def get(key, impl, path, method, batch, beam=1):
        return next((r[key] for r in rows if (r["impl"], r["path"], r["method"], r["batch"], r["beam"]) ==
                     (impl, path, method, batch, beam) and (impl != "hf" or peft_default(r))), None)

    out = []

    def check(target, what, num, den, at_least=None, at_most=None):
        ratio = num / den if num and den else None
        met = None if ratio is None else ratio >= at_least if at_most is None else ratio <= at_most
        out.append({"target": target, "what": what, "ratio": ratio,
                    "goal": f">= {at_least}" if at_most is None else f"<= {at_most}", "met": met})

    D, T = "decode_tokens_per_s", "tokens_per_s"
    check(1, "eager batch-1 decode tokens/s, base model: para-mini eager / Hugging Face eager (dynamic cache)",
          get(D, "para-mini", "eager", "base", 1), get(D, "hf", "eager", "base", 1), at_least=1.5)
    check(2, "fast batch-1 decode tokens/s, base model / floor_tokens_per_s (the CUDA-graph GEMV floor)",
          get(D, "para-mini", "fast", "base", 1), floor, at_least=0.8)
    for path in ("eager", "fast"):
        for batch, beam in ((1, 1), (1, 3)) + (((n, 1),) if n else ()):
            check(3, f"{path} decode tokens/s at batch {batch}, beam {beam}: PARA / base",
                  get(D, "para-mini", path, "para", batch, beam), get(D, "para-mini", path, "base", batch, beam),
                  at_least=0.97)
    for path in ("eager", "fast") if n else ():  # no mixed batches in this run (--mixed none): no target 4
        para = get(T, "para-mini", path, "para", n)
        check(4, f"{path}, {n} requests with {n} distinct adapters, tokens/s: PARA / LoRA (para-mini)",
              para, get(T, "para-mini", path, "lora", n), at_least=1.3)
        check(4, f"{path}, {n} requests with {n} distinct adapters, tokens/s: PARA (para-mini {path}) / PEFT's LoRA "
              "mixed-adapter batch (Hugging Face eager, dynamic cache; PEFT's default fp32 adapters)",
              para, get(T, "hf", "eager", "lora", n), at_least=5)
    check(5, "time to first token at batch 1: PARA / base (both paths prefill with the eager model)",
          get("ttft_s", "para-mini", "eager", "para", 1), get("ttft_s", "para-mini", "eager", "base", 1), at_most=1.05)
    return out


# ------------------------------------------------------------------------------------------ the practical floor

def gemv_weights(model):
    """The weights one decoded token multiplies: every layer's seven linears and the LM head."""
    return [layer.get_submodule(path).weight for layer in model.layers for path in LINEARS.values()] + [
        model.output.weight]


def gemv_floor(model, device, warmup, repeats, replays=20):
    """Tokens/s of replaying, from one CUDA graph, the weight GEMVs of one token: no attention, no overhead."""
    weights = gemv_weights(model)
    xs = {W.shape[1]: torch.randn(1, W.shape[1], dtype=W.dtype, device=device) for W in weights}

    def all_gemvs():
        for W in weights:
            F.linear(xs[W.shape[1]], W)  # x @ W.T

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up cuBLAS off the capturing stream, as CUDA graphs require
        for _ in range(3):
            all_gemvs()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_gemvs()

    def replay():
        for _ in range(replays):
            graph.replay()

    return replays / timed(replay, device, warmup, repeats)[0]


def roofline(model, gpu, rows, floor):
    """The memory-bandwidth bound of batch-1 decoding: each token reads every weight of its GEMVs once."""
    weight_bytes = sum(W.numel() * W.element_size() for W in gemv_weights(model))
    bound = gpu["hbm_bytes_per_s"] / weight_bytes if gpu["hbm_bytes_per_s"] else None
    fast = next((r["decode_tokens_per_s"] for r in rows if (r["impl"], r["path"], r["method"], r["batch"], r["beam"])
                 == ("para-mini", "fast", "base", 1, 1)), None)
    return {"gpu": gpu["name"], "hbm_bytes_per_s": gpu["hbm_bytes_per_s"], "weight_bytes": weight_bytes,
            "hbm_roofline_tokens_per_s": bound,
            "floor_over_roofline": floor / bound if floor and bound else None,
            "fast_base_over_roofline": fast / bound if fast and bound else None}


# ------------------------------------------------------------------------------------------------------- main

def write(report, path):
    """Write the report as JSON to path, whole or not at all: through a temporary file, then a rename, so that a
    run stopped mid-write (a time limit) leaves the last complete version."""
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    os.replace(path + ".tmp", path)


def emit(report, path=None):
    """Print the report as JSON, and write it to `path` too when one is given."""
    print(json.dumps(report, indent=2))
    if path:
        write(report, path)
    return report


def shape_and_dtype(a, device):
    """--shape and --dtype, or their defaults: the 7B shape in bf16 on a GPU, the tiny one in fp32 on a CPU."""
    on_gpu = device.type == "cuda"
    return a.shape or ("7b" if on_gpu else "tiny"), DTYPES[a.dtype or ("bf16" if on_gpu else "fp32")]


def main(argv=None):
    p = argparse.ArgumentParser(description="Decoding speed of para-mini (base, PARA, (IA)^3, LoRA) beside Hugging "
                                "Face + PEFT on the same random weights; prints JSON (and writes it to --out).")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 7b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights' dtype (default: bf16 on CUDA, fp32 on CPU; bf16 on a CPU checks the GPU's dtype)")
    p.add_argument("--quick", action="store_true", help="a few tokens and one repeat: checks that it runs")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face + PEFT even when installed")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast step before capturing it "
                   "(compiled once per batch shape and adapter mix: minutes on the 7B shape)")
    p.add_argument("--methods", default=",".join(METHODS), help="which of them, comma-separated (default: all: "
                   f"{','.join(METHODS)})")
    p.add_argument("--beams", help="beam widths of the batch-1 rows, comma-separated (default: 1,3)")
    p.add_argument("--mixed", help="sizes of the mixed-tenant batches, comma-separated, or none (default: 8,32; "
                   "8 on the 7B shape)")
    p.add_argument("--max-timed-s", type=float, metavar="S",
                   help="time fewer calls (at least one) of a row where the warm-up call says that the usual "
                   "repeats would take over S seconds (default: no limit; each row's JSON says how many it timed)")
    p.add_argument("--out", help="also write the JSON here; rewritten after every row, so a run stopped early "
                   "leaves the rows it measured (\"complete\": false)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape, dtype = shape_and_dtype(a, device)
    if shape == "7b" and device.type != "cuda":
        p.error("--shape 7b needs a CUDA GPU (a 7B model decodes at seconds per token on a CPU)")
    if a.max_timed_s is not None and a.max_timed_s <= 0:
        p.error(f"--max-timed-s {a.max_timed_s} must be positive")
    if a.compile and compile_missing(device):
        p.error(f"--compile: torch.compile cannot build its kernels here, missing {compile_missing(device)}")
    s = {"prompt_len": 274, "new_tokens": 32, "beams": [1, 3], "mixed": [8, 32],
         "warmup": 1, "repeats": 3, "max_timed_s": a.max_timed_s, "compile": a.compile}
    notes = []
    if shape == "7b":
        s["mixed"] = [8]
        notes.append("7B shape: mixed batches of 8 only (the targets' size), to keep the run short: PEFT's "
                     "mixed-adapter batch slows with every adapter it mixes")
    if a.compile:
        # one compiled step per batch shape and adapter mix, not 8 (torch < 2.6 calls the limit cache_size_limit)
        c = torch._dynamo.config
        setattr(c, "recompile_limit" if hasattr(c, "recompile_limit") else "cache_size_limit", 64)
    if a.quick:
        s |= {"prompt_len": 24, "new_tokens": 4, "mixed": [4], "warmup": 1, "repeats": 1}
        notes.append("--quick: 24-token prompts, 4 new tokens, mixed batch of 4, one timed run: a smoke test, "
                     "not the paper's setting")
    s["methods"] = [m for m in a.methods.split(",") if m]
    if not s["methods"] or set(s["methods"]) - set(METHODS):
        p.error(f"--methods {a.methods}: choose among {','.join(METHODS)}")
    try:  # after --quick, so that these choose even then
        if a.beams:
            s["beams"] = [int(b) for b in a.beams.split(",")]
        if a.mixed:
            s["mixed"] = [] if a.mixed == "none" else [int(n) for n in a.mixed.split(",")]
    except ValueError:
        p.error(f"--beams {a.beams} / --mixed {a.mixed}: comma-separated whole numbers (--mixed none: no mixed rows)")
    if min(s["beams"] + s["mixed"], default=1) < 1:
        p.error("--beams and --mixed take numbers of at least 1")
    if a.max_timed_s:
        notes.append(f"--max-timed-s {a.max_timed_s:g}: rows whose warm-up call took over {a.max_timed_s:g} / "
                     f"{s['repeats']} s time fewer calls (timed_calls)")
    if shape == "tiny":
        notes.append("tiny random shape: Python overhead dominates, so ratios say little about a 7B GPU, and CPU "
                     "timings of a few milliseconds vary by tens of percent from run to run")
    notes.append("mixed batches: prompt lengths differ (left padding), greedy decoding, every request its own "
                 "adapter; PEFT mixes adapters in a batch for LoRA only, so Hugging Face (IA)^3 has no mixed rows")
    notes.append("PARA has no Hugging Face counterpart: its ratios are against HF base / LoRA / (IA)^3")

    missing = None if a.no_hf else hf_missing()
    if missing:
        notes.append(f"Hugging Face comparison skipped: {missing}")
    with_hf = not a.no_hf and not missing
    same_attention()
    a_, gpu = SHAPES[shape], gpu_specs(device_name(device))
    report = {
        "shape": shape, "device": gpu["name"],
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "model": {"dim": a_.dim, "n_layers": a_.n_layers, "n_heads": a_.n_heads, "n_kv_heads": a_.n_kv_heads,
                  "ffn_dim": a_.ffn_dim, "vocab_size": a_.vocab_size},
        "methods": {"base": "no adapter", "para": "PARA r=12, K=4, capsule pooler, targets q,v,u",
                    "ia3": "(IA)^3 on k, v, u (= PEFT's k_proj, v_proj, down_proj input)",
                    "lora": "LoRA r=4, alpha=8 on all seven linears, unmerged"},
        "settings": s, "definitions": DEFINITIONS, "notes": notes, "complete": False, "results": [],
        "floor_tokens_per_s": None, "versions": versions(),
    }

    def save(row=None):
        """Add a row (printed on stderr at once) and bring the report's ratios and targets up to date; with --out,
        rewrite the file, so that a run stopped by a time limit keeps every row measured so far."""
        rows = report["results"]
        if row:
            rows.append(row)
            print(f"{row['impl']:9s} {row['path']:5s} {row['method']:5s} batch {row['batch']:2d} beam {row['beam']}: "
                  f"{row['tokens_per_s']:.1f} tokens/s, ttft {row['ttft_s'] * 1e3:.1f} ms", file=sys.stderr)
        report["ratios"] = ratios(rows)
        report["targets"] = targets(rows, report["floor_tokens_per_s"], s["mixed"][0] if s["mixed"] else None)
        report["roofline"] = roofline(model, gpu, rows, report["floor_tokens_per_s"])
        report["cpu_rss_peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                                      if device.type == "cpu" else None)
        if a.out:
            write(report, a.out)

    model = random_model(SHAPES[shape], dtype, device)
    bench_ours(model, s, device, save)
    if device.type == "cuda":  # before Hugging Face's rows, whose slowest come last: a run cut short keeps it
        report["floor_tokens_per_s"] = gemv_floor(model, device, s["warmup"], s["repeats"])
        save()
        r = report["roofline"]
        print(f"floor: {report['floor_tokens_per_s']:.1f} tokens/s; {r['gpu']}'s memory bandwidth over "
              f"{r['weight_bytes'] / 2**30:.2f} GiB of weights: {r['hbm_roofline_tokens_per_s'] or 0:.1f} tokens/s",
              file=sys.stderr)
    if with_hf:
        bench_hf(model, s, device, save)
    report["complete"] = True
    save()
    return emit(report)  # written by save() already


if __name__ == "__main__":
    main()
