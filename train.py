"""Fine-tune LLaMA-2 with PARA / PARADE (or LoRA, (IA)^3, BitFit) on one of the paper's tasks.

    python train.py --data boolq.jsonl --weights weights/Llama-2-7b-hf

The loop is written out by hand so it reads top to bottom: AdamW, linear decay after a 6% warm-up, gradient
accumulation and clipping, loss on the response tokens only, dev loss every --eval-every steps with early
stopping, the best adapter saved atomically, a resumable checkpoint (also on Ctrl-C), then test predictions and
the paper's metric, written as a JSON summary next to the adapter.

More than one GPU: the same script under torchrun (docs/distributed.md); --shard splits the backbone.

    torchrun --nproc_per_node 8 train.py --data boolq.jsonl --weights weights/Llama-2-7b-hf --grad-accum 8
"""
import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from para_mini import (AdapterConfig, add_adapter, find_tokenizer, load_model, load_tokenizer,
                       save_adapter)
from para_mini.adapters import adapter_state, block_state, new_adapter, read_adapter, weights_digest
from para_mini.cli import SEED, Parser, StatusLine, above, at_least, between, usable_device
from para_mini.data import LABELS, SYSTEM_PROMPT, load_task, one_per_query, split, truncate
from para_mini.generation import generate_texts
from para_mini.loading import check_tensors, read_checkpoint, torch_load
from para_mini.metrics import METRIC, label_first_accuracy, score
from para_mini.model import Transformer
from para_mini.peft_format import peft_form_problem

# How much each task may generate at evaluation: labels are a word or two, the rest are free text.
MAX_NEW_TOKENS = {"gsm8k": 256, "e2e": 96, "wikisql": 96, "alpaca": 256, "generic": 128, "squad": 32,
                  "record": 32}


def parser():
    p = Parser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training file (jsonl / tsv / csv / json as published)")
    g.add_argument("--dev", help="dev file (default: a seeded 10%% split of --data)")
    g.add_argument("--test", help="test file (default: a seeded 10%% split of --data when --dev is not given)")
    g.add_argument("--no-test", action="store_true",
                   help="no test set and no test file read: the seeded split of --data keeps its 10%% dev part and "
                        "trains on the rest, exactly as with --test, so settings chosen on dev never see the test set")
    g.add_argument("--task", help="task name; default: recognised from the file's fields")
    g.add_argument("--max-train", type=at_least(1), help="use only the first N training examples (after shuffling)")
    g.add_argument("--max-eval", type=at_least(1), help="evaluate on at most N dev / test examples")
    g.add_argument("--max-len", type=at_least(1), default=512,
                   help="tokens per example; passages are cut to fit (default 512)")
    g.add_argument("--skip-long", action="store_true",
                   help="leave out (and count) examples too long for --max-len even with their passage cut, "
                        "instead of stopping with an error naming the file and line")
    g.add_argument("--system", default=SYSTEM_PROMPT,
                   help="the chat template's system prompt (default: the paper's, Appendix C); \"\" for none")
    g.add_argument("--no-eos-loss", action="store_true",
                   help="leave the EOS that ends each response out of the training and dev loss (the model then does "
                        "not learn to stop: give --max-new-tokens); the paper trains it")
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True, help="checkpoint: HF or Meta directory, llama2.c .bin / .pt")
    g.add_argument("--tokenizer", help="tokenizer.model (default: found beside or inside --weights)")
    g.add_argument("--device", type=usable_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if a GPU is visible, else cpu")
    g.add_argument("--dtype", choices=["fp32", "bf16"], help="backbone dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    g.add_argument("--shard", action="store_true",
                   help="under torchrun: split the backbone across the GPUs (FSDP2), for a model larger than one GPU")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["para", "lora", "ia3", "bitfit"], default="para",
                   help="the adapter to train (default para)")
    g.add_argument("--targets", help="comma-separated among q,k,v,o,g,u,d (default: the method's own)")
    g.add_argument("--r", type=at_least(1), help="PARA bottleneck (default 12) or LoRA rank (default 4)")
    g.add_argument("--pooler", choices=["capsule", "last", "routing", "mean"], default="capsule",
                   help="PARA pooler: capsule = PARADE (default), last = PARA / PARADE-1, routing = PARADE-2")
    g.add_argument("--K", type=at_least(1), default=4, help="PARA capsules; must divide --r (default 4)")
    g.add_argument("--lora-alpha", type=above(0.0), default=8.0,
                   help="LoRA scaling alpha: the update is scaled by alpha / r (default 8)")
    g.add_argument("--proj", type=at_least(0), default=0,
                   help="(IA)^3 / BitFit: make the vectors through a projection of this size (paper 4.1; default 0: "
                        "off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=above(0.0), default=1e-4, help="peak learning rate of AdamW (default 1e-4, the "
                   "paper's for 7B; the 260K model wants about 1e-2)")
    g.add_argument("--weight-decay", type=at_least(0.0), default=0.0, help="AdamW's weight decay (default 0)")
    g.add_argument("--warmup", type=between(0.0, 1.0), default=0.06,
                   help="fraction of the steps spent on linear warm-up, then linear decay to 0 (default 0.06)")
    g.add_argument("--epochs", type=above(0.0), default=3, help="passes over the training data, may be fractional "
                   "(default 3; --max-steps overrides it)")
    g.add_argument("--max-steps", type=at_least(0), help="optimizer steps (default: from --epochs); 0 trains "
                   "nothing and evaluates the untrained adapter")
    g.add_argument("--batch-size", type=at_least(1), default=8, help="examples per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=at_least(1), default=1,
                   help="micro-batches per optimizer step (under torchrun: shared among the GPUs; default 1)")
    g.add_argument("--clip", type=above(0.0), default=1.0, help="gradient norm clipping (default 1.0)")
    g.add_argument("--eval-every", type=at_least(1), default=100, help="dev loss every N steps (default 100)")
    g.add_argument("--select-by", choices=["dev-loss", "label-acc"], default="dev-loss",
                   help="keep the adapter of the evaluation with the lowest dev loss (default), or the highest dev "
                        "label accuracy (the label the greedy answer starts with, on --max-eval dev examples; ties "
                        "go to the lower dev loss). label-acc is for classification tasks; others keep dev loss")
    g.add_argument("--patience", type=at_least(1), default=10,
                   help="stop after N evaluations without a better dev score (default 10)")
    g.add_argument("--seed", type=SEED, default=42, help="data order, split and initialisation (default 42)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory (default: runs/<task>-<method>); a folder that already holds a "
                   "run is refused unless --resume or --overwrite is given")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (adapter, checkpoint, summary, predictions) and start anew")
    g.add_argument("--save-format", choices=["para-mini", "peft"], default="para-mini",
                   help="peft: also write the best adapter as a PEFT directory, <out>/peft (LoRA and (IA)^3; "
                        "default: para-mini only)")
    g.add_argument("--beam", type=at_least(1), default=3,
                   help="beam size for the predictions (default 3, the paper's; 1: greedy)")
    g.add_argument("--max-new-tokens", type=at_least(1), help="generation budget (default: per task)")
    g.add_argument("--eval-batch-size", type=at_least(1), default=16,
                   help="examples per batch of dev loss and predictions (default 16)")
    g.add_argument("--log-every", type=at_least(1), default=10, help="show the training loss every N steps "
                   "(default 10)")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.no_test and args.test:
        p.error("--no-test reads no test file: leave out --test")
    return args


# --------------------------------------------------------------------------------------------------- the data

def tokenize(examples, tok, max_len, system, budget=None, skip_long=False, context=None):
    """(prompt_ids, response_ids) per example, passages shortened so the whole example fits in max_len; with a
    generation budget, the prompt alone is fitted into max_len - budget (evaluation: the response is generated).
    -> (pairs, passages cut, indices of the examples left out as too long: only with skip_long, else an error)."""
    if budget is None:
        count = lambda q, r: sum(map(len, tok.encode_chat(q, r, system)))
    else:
        count = lambda q, r: len(tok.encode_chat(q, None, system)[0]) + budget
    out, cut, skipped = [], 0, []
    for i, ex in enumerate(examples):
        try:
            ex, was_cut = truncate(ex, count, max_len)
        except ValueError as e:
            if skip_long:
                skipped.append(i)
                continue
            where = ex.source or f"example {i}"
            raise ValueError(f"{where}: {e}{'' if budget is None else f' (with {budget} tokens to generate)'}; "
                             f"{too_long_hint(max_len, budget, context)}") from None
        cut += was_cut
        out.append(tok.encode_chat(ex.query, ex.response, system))
    return out, cut, skipped


def too_long_hint(max_len, budget, context):
    ways = ["--skip-long leaves such examples out (and counts them)"]
    if context and max_len < context:
        ways.append(f"raise --max-len (the model's context is {context} tokens)")
    if budget is not None:
        ways.append("lower --max-new-tokens")
    return ", or ".join(ways)


def collate(pairs, pad_id, device):
    """Right-padded inputs, targets that are -100 except on response tokens (EOS included), prompt lengths."""
    T = max(len(p) + len(r) for p, r in pairs)
    tokens = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(pairs):
        seq = p + r
        tokens[b, :len(seq)] = torch.tensor(seq)
        targets[b, len(p) - 1:len(seq) - 1] = torch.tensor(r)  # position t predicts token t + 1
    lens = torch.tensor([len(p) for p, _ in pairs])
    return tokens.to(device), targets.to(device), lens.to(device)


@lru_cache(maxsize=4)
def epoch_order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batch_indices(step, n, per_step, seed):
    """The training examples of optimizer step `step`: a function of the step alone, so resuming is exact."""
    idx = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        idx.append(epoch_order(n, epoch, seed)[i])
    return idx


# --------------------------------------------------------------------------------------------------- the loop

def lr_at(step, total, args):
    warmup = max(1, math.ceil(args.warmup * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * max(0.0, (total - step) / max(1, total - warmup))


def loss_sum(model, tokens, targets, lens, autocast):
    """Summed cross-entropy over the response tokens; only their positions go through the LM head (a 512-token
    BoolQ example has a one-word answer: this saves 8 x 512 x 32000 fp32 logits and their gradient on 7B)."""
    scored = targets != -100
    with autocast:
        logits = model(tokens, prompt_lens=lens, logits_at=scored)
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum")


@torch.no_grad()
def dev_loss(model, pairs, args, pad_id, autocast, show=None):
    total, n = 0.0, 0
    for i in range(0, len(pairs), args.eval_batch_size):
        tokens, targets, lens = collate(pairs[i:i + args.eval_batch_size], pad_id, args.device)
        total += loss_sum(model, tokens, targets, lens, autocast).item()
        n += (targets != -100).sum().item()
        if show is not None:
            show("dev loss", min(i + args.eval_batch_size, len(pairs)), len(pairs))
    return total / n


def atomic_save(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)  # the run's folder is made by its first file
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# The settings a resumed run must share with the interrupted one, or it would not continue the same run.
SAME_RUN = ("data", "dev", "task", "max_train", "max_eval", "max_len", "system", "no_eos_loss", "weights", "method",
            "targets", "r", "pooler", "K", "lora_alpha", "proj", "lr", "weight_decay", "warmup", "epochs", "max_steps",
            "batch_size", "grad_accum", "clip", "eval_every", "patience", "seed", "select_by")


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def same_run_settings(args, model):
    # files by content, not by how their path is spelt (a relative and an absolute path are the same file);
    # made once per run, on every rank under --shard (weights_digest gathers); the adapter file records it too
    settings = {k: getattr(args, k) for k in SAME_RUN}
    settings["data"], settings["dev"] = file_digest(args.data), args.dev and file_digest(args.dev)
    settings["weights"] = weights_digest(model, whole)
    return settings


def checkpoint_state(model, opt, step, best, bad, settings, history=()):
    """Every tensor whole, so one file resumes with or without torchrun; under --shard every rank must call this.
    best: the kept evaluation's dev loss, or with --select-by label-acc [-accuracy, dev loss] (lower is better)."""
    optimizer = opt.state_dict()  # AdamW's moments are sharded like their parameters under --shard: gather them
    optimizer["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
    return {"step": step, "best": best, "bad": bad, "optimizer": optimizer, "settings": settings,
            "adapter": adapter_tensors(model), "history": list(history)}


class Progress:
    """The step line, updated in place on a terminal and kept on screen when an evaluation starts; the evaluations'
    own progress, erased when their result is printed; a plain line per log step otherwise (logs, CI)."""
    LOG_SECONDS = 30  # evaluation progress in a log: a line at most this often, so long evaluations are not silent

    def __init__(self, total, start_step):
        self.total, self.start_step, self.t0, self.status = total, start_step, time.time(), StatusLine(sys.stdout)
        self.tokens, self.train_seconds = 0, 0.0  # tokens/s counts training steps, not evaluations
        self.phase, self.phase_t0, self.phase_done, self.logged = None, 0.0, 0, 0.0

    def show(self, step, loss, lr):
        el = time.time() - self.t0
        done = step + 1 - self.start_step
        eta = el / max(1, done) * (self.total - step - 1)
        tps = self.tokens / max(self.train_seconds, 1e-9)
        self.status.update(f"step {step + 1}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
                           f"  elapsed {el:,.0f}s  eta {eta:,.0f}s", keep=True)

    def count(self, what, done, total):
        """Progress through an evaluation (dev loss, predictions), with its own elapsed time and ETA."""
        now = time.time()
        if what != self.phase or done <= self.phase_done:  # a new evaluation starts its own clock
            self.phase, self.phase_t0, self.logged = what, now - 1e-9, now
        self.phase_done = done
        if not self.status.tty and (now - self.logged < self.LOG_SECONDS or done == total):
            return
        self.logged = now
        el = now - self.phase_t0
        self.status.update(f"{what}: {done}/{total}  elapsed {el:,.0f}s  eta {el / done * (total - done):,.0f}s")

    def message(self, text):
        self.status.print(text)


# What a run leaves in its folder: a new run must not mix its files with these.
RUN_FILES = ("adapter.safetensors", "checkpoint.pt", "summary.json", "predictions_dev.jsonl", "predictions_test.jsonl")


def claim_out(out, args, rank=0):
    """Make `out` this run's folder. A folder holding another run is refused: it is continued (--resume), replaced
    (--overwrite) or left alone (another --out), never silently overwritten or mixed with this one. Under torchrun
    every rank checks (and refuses alike), rank 0 alone deletes and makes the folder."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume:
        if not (out / "checkpoint.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return
    if found and not args.overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                              "replace it with --overwrite, or give another --out")
    if rank == 0:  # the folder itself is made by the run's first file, so a run that fails before has left none
        for name in found:
            (out / name).unlink()


# ------------------------------------------------------------------------------- more than one process (torchrun)
# nanoGPT's way: torchrun starts one process per GPU and sets RANK / WORLD_SIZE / LOCAL_RANK; each process takes its
# share of every step's micro-batches, PyTorch averages the adapter's gradients (DDP, or FSDP2 with --shard), and
# rank 0 alone prints and writes files. Plain `python train.py` is one process of rank 0.

def start_processes(args):
    """(rank, world size): joins torchrun's process group and takes this rank's GPU; (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        if args.shard:
            raise ValueError("--shard splits the model across processes: launch with torchrun --nproc_per_node N")
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    if args.grad_accum % world:
        raise ValueError(f"the --grad-accum {args.grad_accum} micro-batches of a step are shared among {world} "
                         f"processes: make it a multiple of {world} (e.g. --batch-size 1 --grad-accum {world})")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    return rank, world


def all_ranks_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def rank_0s(x: float, device) -> float:
    """Rank 0's value on every rank, so that all ranks take rank 0's decisions (best adapter, early stop)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.item()


def load_sharded(args, cfg, dtype):
    """The model with its adapter split across the ranks by FSDP2, one shard per rank and never whole on any: built
    on the meta device, each block sharded, then every tensor read alone from the memory-mapped checkpoint, and only
    this rank's rows of it kept (distribute_tensor with src_data_rank=None slices locally, sends nothing)."""
    margs, tensors, unused = read_checkpoint(Path(args.weights))
    with torch.device("meta"):
        model = Transformer(margs)  # a tied output is loaded as an equal copy of the embedding (LLaMA-2 is untied)
    check_tensors(args.weights, tensors, {n: tuple(t.shape) for n, t in model.state_dict().items()}, unused)
    with torch.random.fork_rng(devices=[]):  # the adapter's initial values, drawn as add_adapter draws them
        fresh = {f"layers.{i}.{k}": p for i, block in enumerate(model.layers)
                 for k, p in block_state(new_adapter(margs, cfg, block), cfg).items()}
    add_adapter(model, cfg)  # on the meta device: the shapes, and requires_grad on the adapter alone
    file_key = {id(p): k for k, p in adapter_state(model).items()}
    file_key = {name: file_key[id(p)] for name, p in model.named_parameters() if id(p) in file_key}
    for block in model.layers:
        fully_shard(block)  # a block's weights are gathered for its forward and backward, then freed
    fully_shard(model)  # the embedding, final norm and LM head
    state = {}
    for name, p in model.state_dict().items():
        if name in file_key:
            full = fresh[file_key[name]].detach().to(args.device)  # fp32, as add_adapter keeps adapters
        else:
            full = tensors[name].read().to(device=args.device, dtype=dtype)
        state[name] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    model.load_state_dict(state, assign=True)
    return model.eval()


def whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t  # sharded: gathered from every rank (all must call)


def adapter_tensors(model):
    """The adapter's tensors by file name, whole; under --shard every rank must call this (it gathers)."""
    return {k: whole(v).detach().clone() for k, v in adapter_state(model).items()}


def like(p, t):
    """A whole tensor t as parameter p holds it: under --shard this rank's rows of it alone (sliced, not sent)."""
    t = t.to(p.device, p.dtype)
    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else t


def set_adapter(model, tensors):
    """Copy an adapter's tensors (file name -> whole tensor) into the model; under --shard each rank its rows."""
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            p.copy_(like(p, tensors[name]))


def set_optimizer(opt, params, state):
    """opt.load_state_dict of checkpoint_state's whole tensors; under --shard each rank keeps its rows of each."""
    for i, s in state["state"].items():
        s.update({k: like(params[i], v) for k, v in s.items() if k != "step"})  # the step count is one number
    opt.load_state_dict(state)


class Stopped(KeyboardInterrupt):
    """A Ctrl-C after which train() has said what the run kept."""


def check_files(args):
    """Every file a flag names exists and is a file (--weights: or a folder), before anything is read."""
    for flag in ("data", "dev", "test", "tokenizer"):
        path = getattr(args, flag)
        if path is not None and Path(path).is_dir():
            raise ValueError(f"--{flag} {path} is a folder: give the file itself"
                             + (" (tokenizer.model)" if flag == "tokenizer" else " (.jsonl, .json, .tsv or .csv)"))
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag} {path}: no such file")
    if not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights {args.weights}: no such file or folder")


def train(args, on_step=None):
    check_files(args)
    targets = tuple(args.targets.split(",")) if args.targets else ()
    cfg = AdapterConfig(args.method, targets, r=args.r or 0, pooler=args.pooler, K=args.K, alpha=args.lora_alpha,
                        proj=args.proj)
    if args.save_format == "peft" and peft_form_problem(cfg):
        raise ValueError(f"--save-format peft: {peft_form_problem(cfg)}")
    torch.manual_seed(args.seed)
    rank, world = start_processes(args)  # (0, 1) without torchrun
    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device != "cpu" else "fp32")]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()

    # data
    task, train_ex = load_task(args.data, args.task)
    dev_ex = load_task(args.dev, task)[1] if args.dev else None
    test_ex = load_task(args.test, task)[1] if args.test else None
    if dev_ex is None:
        no_split_test = test_ex or args.dev or args.no_test  # --no-test: the same train / dev parts as with --test
        train_ex, dev_ex, split_test = split(train_ex, 0.1, 0.0 if no_split_test else 0.1, seed=args.seed)
        test_ex = test_ex if test_ex is not None else (split_test or None)
    by_acc = args.select_by == "label-acc" and task in LABELS
    if args.select_by == "label-acc" and not by_acc:
        print(f"--select-by label-acc: {task} has no labels, so the best adapter is kept by dev loss", flush=True)
    if args.max_train:
        train_ex = [train_ex[i] for i in epoch_order(len(train_ex), -1, args.seed)[:args.max_train]]
    for name, part in (("train", train_ex), ("dev", dev_ex)):
        if not part:
            flag = name if name != "train" else "data"
            raise ValueError(f"the {name} split is empty: give more data or a --{flag} file")
    dev_eval = one_per_query(dev_ex)[:args.max_eval]
    test_eval = one_per_query(test_ex)[:args.max_eval] if test_ex else None
    out = Path(args.out or f"runs/{task}-{args.method}")
    claim_out(out, args, rank)  # before the model loads: a refused folder costs nothing
    ckpt_path, adapter_path = out / "checkpoint.pt", out / "adapter.safetensors"
    ck = read_run_checkpoint(ckpt_path) if args.resume else None  # and an unreadable checkpoint neither
    if world > 1:
        dist.barrier()  # every rank starts once rank 0 has emptied the folder (--overwrite)

    # model, tokenizer, adapter
    if args.shard:
        model = load_sharded(args, cfg, dtype)  # with the adapter already attached
    else:
        model = load_model(args.weights, dtype=dtype, device=device, max_seq_len=None)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(args.weights))
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model {model.args.vocab_size}: "
                         "pass the --tokenizer the weights were trained with")
    if args.max_len > model.args.max_seq_len:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    model.checkpointing = args.grad_checkpointing
    system = args.system
    fit = dict(skip_long=args.skip_long, context=model.args.max_seq_len)
    train_pairs, cut, train_skipped = tokenize(train_ex, tok, args.max_len, system, **fit)
    dev_pairs, dev_cut, dev_skipped = tokenize(dev_ex[:args.max_eval], tok, args.max_len, system, **fit)
    if args.no_eos_loss:  # every response ends with EOS (encode_chat): without it, nothing is trained to follow it
        train_pairs, dev_pairs = [(p, r[:-1]) for p, r in train_pairs], [(p, r[:-1]) for p, r in dev_pairs]
    skipped = {"train": len(train_skipped), "dev": len(dev_skipped)}
    # the test examples as scored: one per prompt, at most --max-eval
    print(f"task {task}: {len(train_pairs)} train / {len(dev_pairs)} dev / {len(test_eval or [])} test examples; "
          f"{cut + dev_cut} passages truncated to fit {args.max_len} tokens"
          + (f"; {sum(skipped.values())} too long even so, skipped ({skipped})" if args.skip_long else ""),
          flush=True)
    if not train_pairs or not dev_pairs:
        raise ValueError(f"every {'train' if not train_pairs else 'dev'} example is longer than --max-len "
                         f"{args.max_len} tokens")
    if not args.shard:
        add_adapter(model, cfg)
    params = list(adapter_state(model).values())  # in the order of the adapter's file (and of older checkpoints)
    print(f"{args.method}: {sum(p.numel() for p in params):,} tunable parameters ({asdict(cfg)})", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    # DDP averages the adapter's gradients over the ranks in backward (the frozen backbone has none to send);
    # --shard's FSDP2 does the same for the shards. Evaluation calls `model` itself, which DDP leaves untouched.
    ddp_model = DDP(model) if world > 1 and not args.shard else model

    per_step = args.batch_size * args.grad_accum
    total = args.max_steps if args.max_steps is not None else \
        max(1, math.ceil(args.epochs * len(train_pairs) / per_step))
    settings = same_run_settings(args, model)  # what a resume must find unchanged; --shard: every rank gathers
    # best: what the kept adapter scored, lower is better (with label-acc: -accuracy, then the dev loss for ties)
    step, best, bad, history = 0, (float("inf"), float("inf")) if by_acc else float("inf"), 0, []
    if args.resume:
        changed = {k: (v, settings.get(k)) for k, v in ck["settings"].items() if settings.get(k) != v}
        if changed:
            raise ValueError(f"--resume: {ckpt_path} was written with other settings (was, now; files and the base "
                             f"weights by content): {changed}; resume with the interrupted run's flags and files, "
                             "or start anew with another --out")
        set_adapter(model, ck["adapter"])
        # AdamW's state is by parameter position: the order of the adapter's tensors in the run that wrote it (older
        # checkpoints, from stacked tenants, had PARA's up.bias before up.weight, and shapes [1, ...])
        was, state = {name: i for i, name in enumerate(ck["adapter"])}, ck["optimizer"]["state"]
        ck["optimizer"]["state"] = {i: {k: v.view(p.shape) if v.dim() else v for k, v in state[was[n]].items()}
                                    for i, (n, p) in enumerate(adapter_state(model).items())
                                    if was[n] in state}
        set_optimizer(opt, params, ck["optimizer"])
        step, best, bad = ck["step"], ck["best"], ck["bad"]
        best, history = tuple(best) if isinstance(best, (list, tuple)) else best, ck.get("history", [])
        if by_acc != isinstance(best, tuple):
            raise ValueError(f"--resume: {ckpt_path} kept its best adapter by "
                             f"{'label-acc' if isinstance(best, tuple) else 'dev-loss'}: give that --select-by")
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    # the loop
    model.train()
    progress = Progress(total, step)
    stop = []  # Ctrl-C asks to stop at the next step boundary, so the checkpoint is never half-updated
    saved = step if args.resume else None  # the step of the checkpoint on disk: what a Ctrl-C leaves

    def on_ctrl_c(signum, frame):
        # a second Ctrl-C quits at once, but not under torchrun: it passes a terminal's Ctrl-C on, so each rank gets
        # it twice (torchrun kills ranks that are late to stop)
        if stop and world == 1:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        stop.append(True)
        progress.message("Ctrl-C: saving a checkpoint after this step (press again to quit at once)")

    greedy = argparse.Namespace(**vars(args) | {"beam": 1})  # the dev label accuracy's decoding
    kept_dev_texts = []  # with --select-by label-acc: the kept evaluation's dev generations
    train_losses = []  # the steps' training losses since the last evaluation, for the history

    def evaluate():
        """The dev loss (and with --select-by label-acc the dev label accuracy); the adapter saved when it is the
        best yet; a line of history; a checkpoint."""
        nonlocal best, bad, saved
        model.eval()
        # every rank computes it (--shard: each forward needs them all) and all take rank 0's number
        loss = rank_0s(dev_loss(model, dev_pairs, args, tok.pad_id, autocast, progress.count), device)
        acc = texts = None
        if by_acc:
            show = lambda what, done, total: progress.count(f"dev {what}", done, total)
            texts = predict(model, tok, task, dev_eval, greedy, system, show)
            kept = [(t, ex.response) for t, ex in zip(texts, dev_eval) if t is not None]  # None: too long
            acc = rank_0s(label_first_accuracy(task, *map(list, zip(*kept))), device)
        model.train()
        key = (-acc, loss) if by_acc else loss
        better = key < best
        best, bad = (key, 0) if better else (best, bad + 1)
        if better:
            kept_dev_texts[:] = texts or []
            adapter = adapter_tensors(model)  # --shard: gathered from every rank
            if rank == 0:
                save_adapter(model, adapter_path, tensors=adapter, digest=settings["weights"])
        history.append({"step": step, "train_loss": statistics.fmean(train_losses) if train_losses else None,
                        "dev_loss": loss} | ({"dev_label_acc": acc} if by_acc else {}))
        train_losses.clear()
        progress.message(f"step {step}: dev loss {loss:.4f}" + (f", dev label acc {acc:.1f}" if by_acc else "")
                         + ("  (best: adapter saved)" if better else f"  (no better for {bad} / {args.patience})"))
        ck = checkpoint_state(model, opt, step, best, bad, settings, history)  # --shard: gathered from every rank
        if rank == 0:
            atomic_save(ck, ckpt_path)
        saved = step

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        if total == 0:
            evaluate()  # --max-steps 0: the untrained adapter, evaluated as it is
        while step < total and bad < args.patience and not stop:
            t0 = time.time()
            lr = lr_at(step, total, args)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = [train_pairs[i] for i in batch_indices(step, len(train_pairs), per_step, args.seed)]
            n_tokens = sum(len(r) for _, r in batch)  # the loss is a mean over the step's response tokens
            step_loss = 0.0
            for m in range(rank * args.batch_size, per_step, world * args.batch_size):  # this rank's micro-batches
                tokens, tgt, lens = collate(batch[m:m + args.batch_size], tok.pad_id, device)
                # * world: DDP / FSDP average the ranks' gradients, and the step's gradient is their sum
                loss = loss_sum(ddp_model, tokens, tgt, lens, autocast) * world / n_tokens
                loss.backward()
                step_loss += loss.item() / world
                progress.tokens += tokens.numel() * world  # the other ranks' micro-batches are about as large
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            train_losses.append(all_ranks_sum(step_loss, device))
            progress.train_seconds += time.time() - t0
            if step % args.log_every == 0 or step == total:
                progress.show(step - 1, all_ranks_sum(step_loss, device), lr)
            if step % args.eval_every == 0 or step == total:
                evaluate()
            if on_step is not None:
                on_step(step)
            if world > 1 and all_ranks_sum(len(stop), device) and not stop:
                stop.append(True)  # a Ctrl-C that reached any rank stops every rank after this same step
        if stop:
            ck = checkpoint_state(model, opt, step, best, bad, settings, history)
            if rank == 0:
                atomic_save(ck, ckpt_path)
            saved = step
            if world > 1:
                dist.barrier()  # every rank leaves once the checkpoint is on disk
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # the first Ctrl-C, once its checkpoint is saved, or a second one, at once
        progress.message(f"interrupted after step {step} of {total}: " + (
            f"{ckpt_path} holds step {saved}; continue with --resume" if saved is not None else
            f"nothing was saved yet (the first checkpoint comes with the first dev loss, at step "
            f"{min(args.eval_every, total)})"))
        raise Stopped from None
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.status.end()
    if bad >= args.patience:
        progress.message(f"early stop at step {step}: the dev {'label accuracy' if by_acc else 'loss'} did not "
                         f"improve for {args.patience} evaluations")
    if world > 1:
        dist.barrier()  # rank 0 has written the best adapter
        if rank != 0 and not args.shard:
            return None  # DDP: rank 0 alone evaluates
    if not adapter_path.exists():
        raise RuntimeError(f"no adapter was saved in {out}: the dev loss was never finite")

    # evaluation with the best adapter, as it is saved on disk
    model.eval()
    set_adapter(model, read_adapter(adapter_path)[2])
    if args.save_format == "peft" and rank == 0:
        save_adapter(model, out / "peft", tensors=read_adapter(adapter_path)[2], format="peft")
    best_eval = next((h for h in reversed(history) if (
        (-h["dev_label_acc"], h["dev_loss"]) if by_acc else h["dev_loss"]) == best), None)  # None: kept before resume
    summary = {"task": task, "metric_name": METRIC[task], "adapter": str(adapter_path), "steps": step,
               "best_dev_loss": best[1] if by_acc else best, "select_by": "label-acc" if by_acc else "dev-loss",
               "best_step": best_eval and best_eval["step"], "history": history,
               "train_examples": len(train_pairs), "truncated": cut + dev_cut,
               "skipped_too_long": skipped, "settings": {k: v for k, v in vars(args).items()},
               "adapter_config": asdict(cfg)}
    if by_acc:
        summary["best_dev_label_acc"] = -best[0]
    try:
        for name, part in (("dev", dev_eval), ("test", test_eval)):
            if part:
                show = lambda what, done, total: progress.count(f"{name} {what}", done, total)
                if name == "dev" and kept_dev_texts and args.beam == 1:
                    preds = kept_dev_texts  # the kept evaluation generated them, greedily, with this very adapter
                else:
                    preds = predict(model, tok, task, part, args, system, show)
                kept = [(ex, pred) for ex, pred in zip(part, preds) if pred is not None]  # None: too long, skipped
                skipped[f"{name} predictions"] = len(part) - len(kept)
                part, preds = [ex for ex, _ in kept], [pred for _, pred in kept]
                summary[name] = score(task, preds, part)
                note = f"; {skipped[f'{name} predictions']} too long, skipped" if args.skip_long else ""
                progress.message(f"{name} {METRIC[task]}: {summary[name][METRIC[task]]:.2f} ({len(part)} examples"
                                 f"{note})")
                if rank != 0:
                    continue  # --shard: every rank generates (each forward needs them all), rank 0 writes
                with open(out / f"predictions_{name}.jsonl", "w") as f:
                    for ex, pred in zip(part, preds):
                        f.write(json.dumps({"prompt": ex.query, "prediction": pred, "references": ex.references})
                                + "\n")
    except KeyboardInterrupt:
        progress.message(f"interrupted while evaluating: the trained adapter is {adapter_path} (no summary yet); "
                         "the same command with --resume evaluates it again")
        raise Stopped from None
    finally:
        progress.status.end()
    if rank != 0:
        return summary
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")
    print(f"adapter: {adapter_path}\nsummary: {out / 'summary.json'}", flush=True)
    return summary


def read_run_checkpoint(path):
    """train.py's checkpoint.pt, read with weights_only (it cannot run code); a file that cannot be read, or that is
    no checkpoint of ours, is one line of error."""
    anew = "Start anew with --overwrite, or give another --out"
    try:
        ck = torch_load(path, mmap=False, remedy=anew)
    except ValueError as e:
        raise ValueError(f"--resume: {e}" + ("" if str(e).endswith(anew) else f". {anew}")) from None
    keys = {"step", "best", "bad", "optimizer", "settings", "adapter"}
    if not isinstance(ck, dict) or not keys <= ck.keys():
        raise ValueError(f"--resume: {path} is not a checkpoint written by train.py (it has no "
                         f"{', '.join(sorted(keys - set(ck if isinstance(ck, dict) else ())))}). {anew}")
    return ck


def predict(model, tok, task, examples, args, system, show=None):
    """Generated text for each example (greedy for --beam 1, else beam search as in the paper); None for an
    example too long to fit, left out with --skip-long."""
    budget = args.max_new_tokens or MAX_NEW_TOKENS.get(task, 8)
    max_len = min(args.max_len, model.args.max_seq_len)
    pairs, _, skipped = tokenize(examples, tok, max_len, system, budget, args.skip_long, model.args.max_seq_len)
    prompts, texts, skipped = [p for p, _ in pairs], [], set(skipped)
    for i in range(0, len(prompts), args.eval_batch_size):  # a batch at a time, to show progress
        texts += generate_texts(model, tok, prompts[i:i + args.eval_batch_size], max_new_tokens=budget,
                                beam=args.beam, batch_size=args.eval_batch_size)
        if show is not None:
            show("predictions", len(texts), len(prompts))
    texts = iter(texts)
    return [None if i in skipped else next(texts) for i in range(len(examples))]


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
        if dist.is_initialized():
            dist.destroy_process_group()
    except Stopped:  # train() has said what the run kept
        sys.exit(130)
    except KeyboardInterrupt:  # before the first step
        print("\ninterrupted before training started: this run wrote no file", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
