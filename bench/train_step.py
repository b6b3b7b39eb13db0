# python bench/train_step.py: the fine-tuning step of train.py on a LLaMA-2 shape with random weights: peak
# memory and tokens/s of PARA (r=12, K=4, q, v, u), beside PEFT LoRA (r=4 on all seven linears) on the very same
# backbone tensors when transformers + peft are installed. Nothing is downloaded. PEFT runs twice: with the LM head
# on the scored tokens only and para_step's loss, like for like with PARA, whose head runs only there ("peft"); and
# as a PEFT user's model(input_ids, labels=...), logits at every position ("peft-full-head").
#
# Peak memory: on a GPU, torch.cuda.max_memory_allocated. A CPU has no such counter, so there the step runs under
# LiveTensors, which adds up the storage of every tensor an operator returns for as long as it is alive (weights,
# saved activations, gradients, optimizer state: what max_memory_allocated counts, less the scratch space kernels
# take internally, such as attention's backward buffers and the BLAS workspace). --depths runs a few
# shallow copies of the shape and fits peak = a + b x layers, which gives the full depth's figure on a machine that
# could not hold it, together with the fit's residual as a check that the line is a line. From two layers on, each
# layer adds its weights and what it keeps for the backward pass (with checkpointing: its input); a single layer
# peaks at another moment of the step, so fit depths of 2 and more.
import argparse
import gc
import json
import statistics
import sys
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# decode.py, the decoding benchmark beside this script, also puts this checkout's para_mini first on the path
from decode import (DTYPES, SHAPES, device_name, emit, gpu_specs, hf_missing, hf_twin, random_model, same_attention,
                    versions, write)
from para_mini.adapters import AdapterConfig, add_adapter, remove_adapter
from para_mini.loading import HF_NAMES
from para_mini.training import loss_sum

PARA = AdapterConfig("para", ("q", "v", "u"), r=12, K=4)
DEFINITIONS = {
    "tokens_per_s": "batch x seq / median wall time of one optimizer step (forward, backward, clipping, AdamW)",
    "peak_mem_gib": "on CUDA: torch.cuda.max_memory_allocated over the steps, weights included; on CPU: the "
                    "LiveTensors count (every tensor storage an operator returned, while alive; kernels' internal "
                    "scratch space is not seen). Before each row the previous one's adapter, optimizer and model "
                    "wrapper are freed and garbage collected, and the allocator's cached blocks given back",
    "peak_mem_reserved_gib": "on CUDA: torch.cuda.max_memory_reserved over the same steps (what the caching "
                             "allocator held from the GPU: allocated plus its slack); null on CPU",
    "impl": "para-mini: train.py's step, the LM head on the scored tokens only (logits_at); peft: PEFT LoRA on "
            "Hugging Face's model with the same advantage, the head on the scored positions only (logits_to_keep) "
            "and the same loss, computed here, so that it and para-mini are like for like; peft-full-head: what a "
            "PEFT user gets from model(input_ids, labels=...): logits at every position (B x T x vocab, upcast to "
            "fp32 in the loss), shown to say what the usual form costs",
    "adapters": "both sides keep the adapter's master weights in fp32 (as train.py) and run their products in "
                "bf16 under autocast",
    "attention": "F.scaled_dot_product_attention on both sides, cuDNN's backend turned off in both (see "
                 "python bench/env.py for the backend of each shape)",
    "model_flops_per_step": "4 x N_blocks x B x T (the blocks' weights, forward and the backward to the "
                            "activations: a frozen backbone needs no weight gradients; recomputation is not counted) "
                            "+ 4 x N_head x scored tokens (the loss needs logits only there; the same for every row, "
                            "so a row that computes logits everywhere does that work uncounted) + 12 x layers x dim x "
                            "T^2 x B (attention: Q K^T and the product with V, 2 x 2 x T^2 x dim per layer and "
                            "sequence forward, twice that backward; PaLM's convention, which counts the whole T x T "
                            "score matrix although a causal kernel skips about half of it); adapters are < 0.2% and "
                            "left out",
    "mfu": "model_flops_per_step / step time / the GPU's dense bf16 peak (its datasheet's, by the device name read "
           "at run time: 989 TFLOP/s on an H100 or H200 SXM); null on a CPU or a GPU not listed",
    "para_over_peft": "at each depth, PARA's tokens/s and peak memory over the like-for-like PEFT row's (peft), from "
                      "the same run; para_over_peft_full_head: over peft-full-head's",
    "complete": "false while the run is going on (or where it was stopped): results holds the rows measured so far",
}

class LiveTensors(TorchDispatchMode):
    """Counts the bytes of live tensor storage, as the CUDA caching allocator's allocated counter does (sizes
    rounded up to its 512-byte blocks). Views share their base's storage and count once; a storage stops counting
    when Python lets go of it."""

    def __init__(self, *already):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.live = self.peak = 0
        for t in already:
            self.count(t)

    def count(self, t):
        storage = t.untyped_storage()
        if storage in self.sizes:
            return
        n = -(-storage.nbytes() // 512) * 512
        self.sizes[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, n)

    def release(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out


def batch(vocab, B, T, response, device, seed=0):
    """Random right-aligned examples as train.py's collate makes them: a prompt, then `response` scored tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (B, T), generator=g)
    targets = torch.full((B, T), -100, dtype=torch.long)
    targets[:, T - response - 1:T - 1] = tokens[:, T - response:]  # position t predicts token t + 1
    lens = torch.full((B,), T - response)
    return tokens.to(device), targets.to(device), lens.to(device)


def update(loss, opt):
    """The end of every step: backward, clip the gradient norm to 1, AdamW, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def para_step(model, opt, tokens, targets, lens, autocast):
    """The step of train.py's loop, for one micro-batch per step: its loss (loss_sum, a mean over the scored
    tokens), then backward, clipping, AdamW."""
    return update(loss_sum(model, tokens, targets, lens, autocast) / (targets != -100).sum(), opt)


def peft_loss(model, tokens, targets):
    """para_step's loss on a Hugging Face (PEFT) model, with the LM head on the scored positions only: its
    logits_to_keep takes the same positions in every row, so the columns some row scores, then the scored ones."""
    scored = targets != -100
    cols = scored.any(0).nonzero()[:, 0]
    logits = model(input_ids=tokens, logits_to_keep=cols).logits  # [B, len(cols), vocab]
    return F.cross_entropy(logits[scored[:, cols]].float(), targets[scored], reduction="sum") / scored.sum()


def peft_full_head_loss(model, tokens, targets):
    """A PEFT user's loss: the model's own from labels (unshifted: HF shifts them), logits at every position."""
    labels = torch.full_like(targets, -100)
    labels[:, 1:] = targets[:, :-1]
    return model(input_ids=tokens, labels=labels).loss


def peft_step(model, opt, tokens, targets, lens, autocast):
    with autocast:
        loss = peft_loss(model, tokens, targets)
    return update(loss, opt)


def peft_full_head_step(model, opt, tokens, targets, lens, autocast):
    with autocast:
        loss = peft_full_head_loss(model, tokens, targets)
    return update(loss, opt)


STEPS = {"para-mini": para_step, "peft": peft_step, "peft-full-head": peft_full_head_step}


def model_flops(args, B, T, scored):
    """model_flops_per_step (DEFINITIONS): the multiply-adds the step needs, x 2 FLOPs each."""
    n_blocks = args.n_layers * (args.dim * (args.dim + 2 * args.n_kv_heads * args.head_dim + args.dim)
                                + 3 * args.dim * args.ffn_dim)
    n_head = args.dim * args.vocab_size
    return 4 * n_blocks * B * T + 4 * n_head * scored + 12 * args.n_layers * args.dim * T * T * B


def run(impl, model, s, device, grad_checkpointing):
    """Time `steps` optimizer steps after one warm-up step; measure the peak over all of them."""
    tokens, targets, lens = batch(s["vocab"], s["batch"], s["seq"], s["response"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if s["dtype"] == "bf16" else nullcontext()
    gc.collect()  # what the previous row left: its optimizer state, PEFT's wrapper, cycles among its modules
    if impl == "para-mini":
        add_adapter(model, PARA)
        model.checkpointing = grad_checkpointing
        net = model
    else:
        import peft
        warnings.filterwarnings("ignore", category=FutureWarning)
        hf = hf_twin(model)
        if grad_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                               target_modules=[x.split(".")[1] for x in list(HF_NAMES.values())[:7]])
        net = peft.get_peft_model(hf, lora)
        net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:  # master weights of the adapter in fp32, as in train.py
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)

    live = LiveTensors(*net.parameters(), tokens, targets, lens) if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with live or nullcontext():
        for i in range(1 + s["steps"]):
            t0 = time.perf_counter()
            STEPS[impl](net, opt, tokens, targets, lens, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            print(f"{impl} step {i + 1}/{1 + s['steps']}: {times[-1]:.2f} s", file=sys.stderr)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else live.peak
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None

    if impl == "para-mini":
        remove_adapter(model)
        model.checkpointing = False
    else:
        net.unload()
    model.requires_grad_(False)
    seconds = statistics.median(times[1:])
    row = {"impl": impl, "method": "para" if impl == "para-mini" else "lora",
           "tunable_params": sum(p.numel() for p in params), "layers": model.args.n_layers,
           "step_s": seconds, "tokens_per_s": s["batch"] * s["seq"] / seconds, "peak_mem_gib": peak / 2**30,
           "peak_mem_reserved_gib": reserved}
    flops = model_flops(model.args, s["batch"], s["seq"], s["batch"] * s["response"])
    peak_flops = s["gpu"]["peak_bf16_flops"]
    row["mfu"] = flops / seconds / peak_flops if peak_flops and s["dtype"] == "bf16" else None
    return row


def fit_line(xs, ys):
    """Least squares y = a + b x -> (a, b, largest |residual|)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys))


def para_over_peft(rows, other="peft"):
    peft = {r["layers"]: r for r in rows if r["impl"] == other}
    return [{"layers": r["layers"], "tokens_per_s": r["tokens_per_s"] / peft[r["layers"]]["tokens_per_s"],
             "peak_mem": r["peak_mem_gib"] / peft[r["layers"]]["peak_mem_gib"]}
            for r in rows if r["impl"] == "para-mini" and r["layers"] in peft]


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory and tokens/s of PARA fine-tuning (train.py's step) on a "
                                "LLaMA-2 shape with random weights, beside PEFT LoRA; prints JSON.")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 7b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (512)")
    p.add_argument("--response", type=int, default=8, help="scored (response) tokens per sequence (8)")
    p.add_argument("--grad-checkpointing", action="store_true", help="as train.py --grad-checkpointing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="backbone dtype, with autocast to it (bf16, as train.py on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (3)")
    p.add_argument("--depths", help="comma-separated layer counts of 2 or more, e.g. 2,3,4: run each and fit peak "
                   "memory against depth (for a shape the machine cannot hold whole)")
    p.add_argument("--no-hf", action="store_true", help="skip PEFT LoRA even when installed")
    p.add_argument("--out", help="also write the JSON here; rewritten after every row (\"complete\": false until "
                   "the end), so a run stopped early leaves the rows it measured")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape = a.shape or ("7b" if device.type == "cuda" else "tiny")
    depths = [int(d) for d in a.depths.split(",")] if a.depths else [SHAPES[shape].n_layers]
    if a.depths and (len(set(depths)) < 2 or min(depths) < 2):
        p.error(f"--depths {a.depths}: give at least two different layer counts, each 2 or more")
    if a.response < 1 or a.response >= a.seq:
        p.error(f"--response {a.response} must be at least 1 and shorter than --seq {a.seq}")
    gpu = gpu_specs(device_name(device))
    s = {"batch": a.batch, "seq": a.seq, "response": a.response, "steps": a.steps, "dtype": a.dtype,
         "vocab": SHAPES[shape].vocab_size, "grad_checkpointing": a.grad_checkpointing, "gpu": gpu}
    dtype = DTYPES[a.dtype]
    missing_hf = None if a.no_hf else hf_missing()
    if missing_hf:
        print(f"PEFT comparison skipped: {missing_hf}", file=sys.stderr)
    with_hf = not a.no_hf and not missing_hf
    same_attention()
    rows = []
    report = {"shape": shape, "device": gpu["name"], "threads": torch.get_num_threads(), "settings": s,
              "methods": {"para": str(PARA), "lora": "PEFT LoRA r=4, alpha=8, on all seven linears"},
              "definitions": DEFINITIONS, "complete": False, "results": rows, "versions": versions()}
    for depth in depths:
        model = random_model(replace(SHAPES[shape], n_layers=depth), dtype, device)
        # the like-for-like rows first, so that a run stopped early has lost the least telling one
        for impl in ("para-mini", "peft", "peft-full-head") if with_hf else ("para-mini",):
            rows.append(run(impl, model, s, device, a.grad_checkpointing))
            print(json.dumps(rows[-1]), file=sys.stderr)
            report["para_over_peft"] = para_over_peft(rows)
            report["para_over_peft_full_head"] = para_over_peft(rows, "peft-full-head")
            if a.out:
                write(report, a.out)
        del model
    if len(depths) > 1:
        full = SHAPES[shape].n_layers
        report["at_full_depth"] = {}
        for impl in sorted({r["impl"] for r in rows}):
            xs, ys = zip(*[(r["layers"], r["peak_mem_gib"]) for r in rows if r["impl"] == impl])
            c, slope, residual = fit_line(xs, ys)
            report["at_full_depth"][impl] = {"layers": full, "peak_mem_gib": c + slope * full,
                                             "gib_per_layer": slope, "fit_max_residual_gib": residual}
    report["complete"] = True
    return emit(report, a.out)


if __name__ == "__main__":
    main()
