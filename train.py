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
import math
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from para_mini import (AdapterConfig, add_adapter, distributed, find_tokenizer, load_model, load_tokenizer, runs,
                       save_adapter)
from para_mini.adapters import adapter_state, read_adapter
from para_mini.cli import (SEED, Parser, Progress, above, add_options, at_least, between, check_options, option,
                           usable_device)
from para_mini.data import LABELS, SYSTEM_PROMPT, one_per_query
from para_mini.metrics import METRIC, score
from para_mini.peft_format import peft_form_problem
from para_mini.training import (batch_indices, collate, dev_loss, label_accuracy, load_splits, loss_sum, lr_at,
                                predict, tokenize)


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a run, each one a flag of its own (`--max-len` for max_len; see parser())."""
    data: str = option("training file (jsonl / tsv / csv / json as published)", required=True, group="data")
    dev: str = option("dev file (default: a seeded 10%% split of --data)")
    test: str = option("test file (default: a seeded 10%% split of --data when --dev is not given)")
    no_test: bool = option("no test set and no test file read: the seeded split of --data keeps its 10%% dev part and "
                           "trains on the rest, exactly as with --test, so settings chosen on dev never see the test "
                           "set", False)
    task: str = option("task name; default: recognised from the file's fields")
    max_train: int = option("use only the first N training examples (after shuffling)", type=at_least(1))
    max_eval: int = option("evaluate on at most N dev / test examples", type=at_least(1))
    max_len: int = option("tokens per example; passages are cut to fit (default 512)", 512, at_least(1))
    skip_long: bool = option("leave out (and count) examples too long for --max-len even with their passage cut, "
                             "instead of stopping with an error naming the file and line", False)
    system: str = option("the chat template's system prompt (default: the paper's, Appendix C); \"\" for none",
                         SYSTEM_PROMPT)
    no_eos_loss: bool = option("leave the EOS that ends each response out of the training and dev loss (the model "
                               "then does not learn to stop: give --max-new-tokens); the paper trains it", False)

    weights: str = option("checkpoint: HF or Meta directory, llama2.c .bin / .pt", required=True, group="model")
    tokenizer: str = option("tokenizer.model (default: found beside or inside --weights)")
    device: str = option("default: cuda if a GPU is visible, else cpu",
                         "cuda" if torch.cuda.is_available() else "cpu", usable_device)
    dtype: str = option("backbone dtype (default: bf16 on GPU, fp32 on CPU)", choices=["fp32", "bf16"])
    grad_checkpointing: bool = option("recompute activations: less memory", False)
    shard: bool = option("under torchrun: split the backbone across the GPUs (FSDP2), for a model larger than one "
                         "GPU", False)

    method: str = option("the adapter to train (default para)", "para", choices=["para", "lora", "ia3", "bitfit"],
                         group="method")
    targets: str = option("comma-separated among q,k,v,o,g,u,d (default: the method's own)")
    r: int = option("PARA bottleneck (default 12) or LoRA rank (default 4)", type=at_least(1))
    pooler: str = option("PARA pooler: capsule = PARADE (default), last = PARA / PARADE-1, routing = PARADE-2",
                         "capsule", choices=["capsule", "last", "routing", "mean"])
    K: int = option("PARA capsules; must divide --r (default 4)", 4, at_least(1))
    lora_alpha: float = option("LoRA scaling alpha: the update is scaled by alpha / r (default 8)", 8.0, above(0.0))
    proj: int = option("(IA)^3 / BitFit: make the vectors through a projection of this size (paper 4.1; default 0: "
                       "off)", 0, at_least(0))

    lr: float = option("peak learning rate of AdamW (default 1e-4, the paper's for 7B; the 260K model wants about "
                       "1e-2)", 1e-4, above(0.0), group="optimisation")
    weight_decay: float = option("AdamW's weight decay (default 0)", 0.0, at_least(0.0))
    warmup: float = option("fraction of the steps spent on linear warm-up, then linear decay to 0 (default 0.06)",
                           0.06, between(0.0, 1.0))
    epochs: float = option("passes over the training data, may be fractional (default 3; --max-steps overrides it)",
                           3, above(0.0))
    max_steps: int = option("optimizer steps (default: from --epochs); 0 trains nothing and evaluates the untrained "
                            "adapter", type=at_least(0))
    batch_size: int = option("examples per micro-batch (default 8)", 8, at_least(1))
    grad_accum: int = option("micro-batches per optimizer step (under torchrun: shared among the GPUs; default 1)",
                             1, at_least(1))
    clip: float = option("gradient norm clipping (default 1.0)", 1.0, above(0.0))
    eval_every: int = option("dev loss every N steps (default 100)", 100, at_least(1))
    select_by: str = option("keep the adapter of the evaluation with the lowest dev loss (default), or the highest "
                            "dev label accuracy (the label the greedy answer starts with, on --max-eval dev examples; "
                            "ties go to the lower dev loss). label-acc is for classification tasks; others keep dev "
                            "loss", "dev-loss", choices=["dev-loss", "label-acc"])
    patience: int = option("stop after N evaluations without a better dev score (default 10)", 10, at_least(1))
    seed: int = option("data order, split and initialisation (default 42)", 42, SEED)

    out: str = option("run directory (default: runs/<task>-<method>); a folder that already holds a run is refused "
                      "unless --resume or --overwrite is given", group="output")
    resume: bool = option("continue from <out>/checkpoint.pt", False)
    overwrite: bool = option("delete the run already in --out (adapter, checkpoint, summary, predictions) and start "
                             "anew", False)
    save_format: str = option("peft: also write the best adapter as a PEFT directory, <out>/peft (LoRA and (IA)^3; "
                              "default: para-mini only)", "para-mini", choices=["para-mini", "peft"])
    beam: int = option("beam size for the predictions (default 3, the paper's; 1: greedy)", 3, at_least(1))
    max_new_tokens: int = option("generation budget (default: per task)", type=at_least(1))
    eval_batch_size: int = option("examples per batch of dev loss and predictions (default 16)", 16, at_least(1))
    log_every: int = option("show the training loss every N steps (default 10)", 10, at_least(1))

    def __post_init__(self):
        check_options(self)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if self.no_test and self.test:
            raise ValueError("--no-test reads no test file: leave out --test")

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(self.method, tuple(self.targets.split(",")) if self.targets else (), r=self.r or 0,
                             pooler=self.pooler, K=self.K, alpha=self.lora_alpha, proj=self.proj)


def parser(only_given=False):
    p = Parser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig, only_given)
    return p


def parse_args(argv=None) -> TrainConfig:
    p = parser()
    try:
        return TrainConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


class Stopped(KeyboardInterrupt):
    """A Ctrl-C after which train() has said what the run kept."""


def train(cfg: TrainConfig, on_step=None):
    runs.check_files({"data": cfg.data, "dev": cfg.dev, "test": cfg.test, "tokenizer": cfg.tokenizer}, cfg.weights)
    adapter_cfg = cfg.adapter()
    if cfg.save_format == "peft" and peft_form_problem(adapter_cfg):
        raise ValueError(f"--save-format peft: {peft_form_problem(adapter_cfg)}")
    torch.manual_seed(cfg.seed)
    rank, world, device = distributed.start(cfg.device, cfg.shard, cfg.grad_accum)  # (0, 1, device) without torchrun
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype or ("bf16" if device != "cpu" else "fp32")]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()

    # data, and the run's folder
    task, train_ex, dev_ex, test_ex = load_splits(cfg.data, cfg.dev, cfg.test, cfg.task, cfg.seed, cfg.max_train,
                                                  cfg.no_test)
    by_acc = cfg.select_by == "label-acc" and task in LABELS
    if cfg.select_by == "label-acc" and not by_acc:
        print(f"--select-by label-acc: {task} has no labels, so the best adapter is kept by dev loss", flush=True)
    dev_eval = one_per_query(dev_ex)[:cfg.max_eval]  # the examples as scored: one per prompt, at most --max-eval
    test_eval = one_per_query(test_ex)[:cfg.max_eval] if test_ex else None
    out = Path(cfg.out or f"runs/{task}-{cfg.method}")
    runs.claim_out(out, cfg.resume, cfg.overwrite, rank)  # before the model loads: a refused folder costs nothing
    ckpt_path, adapter_path = out / "checkpoint.pt", out / "adapter.safetensors"
    ck = runs.read_checkpoint(ckpt_path) if cfg.resume else None  # and an unreadable checkpoint neither
    distributed.barrier()  # every rank starts once rank 0 has emptied the folder (--overwrite)

    # model, tokenizer, adapter
    if cfg.shard:
        model = distributed.load_sharded(cfg.weights, adapter_cfg, dtype, device)  # the adapter already attached
    else:
        model = load_model(cfg.weights, dtype=dtype, device=device, max_seq_len=None)
    tok = load_tokenizer(cfg.tokenizer or find_tokenizer(cfg.weights))
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model {model.args.vocab_size}: "
                         "pass the --tokenizer the weights were trained with")
    if cfg.max_len > model.args.max_seq_len:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    model.checkpointing = cfg.grad_checkpointing
    fit = dict(skip_long=cfg.skip_long, context=model.args.max_seq_len)
    train_pairs, cut, train_skipped = tokenize(train_ex, tok, cfg.max_len, cfg.system, **fit)
    dev_pairs, dev_cut, dev_skipped = tokenize(dev_ex[:cfg.max_eval], tok, cfg.max_len, cfg.system, **fit)
    if cfg.no_eos_loss:  # every response ends with EOS (encode_chat): without it, nothing is trained to follow it
        train_pairs, dev_pairs = [(p, r[:-1]) for p, r in train_pairs], [(p, r[:-1]) for p, r in dev_pairs]
    skipped = {"train": len(train_skipped), "dev": len(dev_skipped)}
    print(f"task {task}: {len(train_pairs)} train / {len(dev_pairs)} dev / {len(test_eval or [])} test examples; "
          f"{cut + dev_cut} passages truncated to fit {cfg.max_len} tokens"
          + (f"; {sum(skipped.values())} too long even so, skipped ({skipped})" if cfg.skip_long else ""), flush=True)
    if not train_pairs or not dev_pairs:
        raise ValueError(f"every {'train' if not train_pairs else 'dev'} example is longer than --max-len "
                         f"{cfg.max_len} tokens")
    if not cfg.shard:
        add_adapter(model, adapter_cfg)
    params = list(adapter_state(model).values())  # in the order of the adapter's file
    print(f"{cfg.method}: {sum(p.numel() for p in params):,} tunable parameters ({asdict(adapter_cfg)})", flush=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # DDP averages the adapter's gradients over the ranks in backward (the frozen backbone has none to send);
    # --shard's FSDP2 does the same for the shards. Evaluation calls `model` itself, which DDP leaves untouched.
    ddp_model = DDP(model) if world > 1 and not cfg.shard else model

    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * len(train_pairs) / per_step))
    settings = runs.same_run_settings(asdict(cfg), model)  # what a resume must find unchanged
    # best: what the kept adapter scored, lower is better (with label-acc: -accuracy, then the dev loss for ties)
    step, best, bad, history = 0, (float("inf"), float("inf")) if by_acc else float("inf"), 0, []
    rank_key = lambda h: (-h["dev_label_acc"], h["dev_loss"]) if by_acc else h["dev_loss"]  # an evaluation's best
    if cfg.resume:
        step, best, bad, history = runs.resume(ck, ckpt_path, settings, model, opt, by_acc)
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    # the loop
    model.train()
    progress = Progress(sys.stdout)
    progress.start("step", step)
    tokens_seen, train_seconds = 0, 0.0  # tokens/s counts training steps, not evaluations
    stop = []  # Ctrl-C asks to stop at the next step boundary, so the checkpoint is never half-updated
    saved = step if cfg.resume else None  # the step of the checkpoint on disk: what a Ctrl-C leaves
    shown = lambda prefix: lambda what, done, of: progress.count(f"{prefix}{what}:", done, of)  # "dev loss: 4/8"
    kept_dev_texts = []  # with --select-by label-acc: the kept evaluation's dev generations
    train_losses = []  # the steps' training losses since the last evaluation, for the history

    def on_ctrl_c(signum, frame):
        # a second Ctrl-C quits at once, but not under torchrun: it passes a terminal's Ctrl-C on, so each rank gets
        # it twice (torchrun kills ranks that are late to stop)
        if stop and world == 1:
            raise KeyboardInterrupt
        stop.append(True)
        progress.print("Ctrl-C: saving a checkpoint after this step (press again to quit at once)")

    def save_checkpoint():
        nonlocal saved
        ck = runs.checkpoint_state(model, opt, step, best, bad, settings, history)  # --shard: from every rank
        if rank == 0:
            runs.atomic_save(ck, ckpt_path)
        saved = step

    def evaluate():
        """The dev loss (and with --select-by label-acc the dev label accuracy); the adapter saved when it is the
        best yet; a line of history; a checkpoint."""
        nonlocal best, bad
        model.eval()
        # every rank computes them (--shard: each forward needs them all) and all take rank 0's numbers
        loss = distributed.rank_0s(dev_loss(model, dev_pairs, tok.pad_id, device, autocast, cfg.eval_batch_size,
                                            shown("")), device)
        acc = texts = None
        if by_acc:  # the dev examples' greedy answers, scored by the label each starts with
            acc, texts = label_accuracy(model, tok, task, dev_eval, cfg.system, cfg.max_len, cfg.max_new_tokens,
                                        cfg.eval_batch_size, cfg.skip_long, shown("dev "))
            acc = distributed.rank_0s(acc, device)
        model.train()
        history.append({"step": step, "train_loss": statistics.fmean(train_losses) if train_losses else None,
                        "dev_loss": loss} | ({"dev_label_acc": acc} if by_acc else {}))
        train_losses.clear()
        key = rank_key(history[-1])
        better = key < best
        best, bad = (key, 0) if better else (best, bad + 1)
        if better:
            kept_dev_texts[:] = texts or []
            adapter = runs.adapter_tensors(model)  # --shard: gathered from every rank
            if rank == 0:
                save_adapter(model, adapter_path, tensors=adapter, digest=settings["weights"])
        progress.print(f"step {step}: dev loss {loss:.4f}" + (f", dev label acc {acc:.1f}" if by_acc else "")
                       + ("  (best: adapter saved)" if better else f"  (no better for {bad} / {cfg.patience})"))
        save_checkpoint()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        if total == 0:
            evaluate()  # --max-steps 0: the untrained adapter, evaluated as it is
        while step < total and bad < cfg.patience and not stop:
            t0 = time.time()
            lr = lr_at(step, total, cfg.lr, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = [train_pairs[i] for i in batch_indices(step, len(train_pairs), per_step, cfg.seed)]
            n_tokens = sum(len(r) for _, r in batch)  # the loss is a mean over the step's response tokens
            step_loss = 0.0
            for m in range(rank * cfg.batch_size, per_step, world * cfg.batch_size):  # this rank's micro-batches
                tokens, targets, lens = collate(batch[m:m + cfg.batch_size], tok.pad_id, device)
                # * world: DDP / FSDP average the ranks' gradients, and the step's gradient is their sum
                loss = loss_sum(ddp_model, tokens, targets, lens, autocast) * world / n_tokens
                loss.backward()
                step_loss += loss.item() / world
                tokens_seen += tokens.numel() * world  # the other ranks' micro-batches are about as large
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            train_seconds += time.time() - t0
            step_loss = distributed.all_ranks_sum(step_loss, device)  # every rank's micro-batches: the step's loss
            train_losses.append(step_loss)
            if step % cfg.log_every == 0 or step == total:
                progress.count("step", step, total, f"loss {step_loss:.4f}  lr {lr:.2e}  "
                               f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s", keep=True)
            if step % cfg.eval_every == 0 or step == total:
                evaluate()
            if on_step is not None:
                on_step(step)
            if world > 1 and distributed.all_ranks_sum(len(stop), device) and not stop:
                stop.append(True)  # a Ctrl-C that reached any rank stops every rank after this same step
        if stop:
            save_checkpoint()
            distributed.barrier()  # every rank leaves once the checkpoint is on disk
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # the first Ctrl-C, once its checkpoint is saved, or a second one, at once
        progress.print(f"interrupted after step {step} of {total}: " + (
            f"{ckpt_path} holds step {saved}; continue with --resume" if saved is not None else
            f"nothing was saved yet (the first checkpoint comes with the first dev loss, at step "
            f"{min(cfg.eval_every, total)})"))
        raise Stopped from None
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.end()
    if bad >= cfg.patience:
        progress.print(f"early stop at step {step}: the dev {'label accuracy' if by_acc else 'loss'} did not "
                       f"improve for {cfg.patience} evaluations")
    distributed.barrier()  # rank 0 has written the best adapter
    if rank != 0 and not cfg.shard:
        return None  # DDP: rank 0 alone evaluates
    if not adapter_path.exists():
        raise RuntimeError(f"no adapter was saved in {out}: the dev loss was never finite")

    # evaluation with the best adapter, as it is saved on disk
    model.eval()
    runs.set_adapter(model, read_adapter(adapter_path)[2])
    if cfg.save_format == "peft" and rank == 0:
        save_adapter(model, out / "peft", tensors=read_adapter(adapter_path)[2], format="peft")
    best_eval = next((h for h in reversed(history) if rank_key(h) == best), None)  # None: kept before a resume
    summary = {"task": task, "metric_name": METRIC[task], "adapter": str(adapter_path), "steps": step,
               "best_dev_loss": best[1] if by_acc else best, "select_by": "label-acc" if by_acc else "dev-loss",
               "best_step": best_eval and best_eval["step"], "history": history,
               "train_examples": len(train_pairs), "truncated": cut + dev_cut, "skipped_too_long": skipped,
               "settings": asdict(cfg), "adapter_config": asdict(adapter_cfg)}
    if by_acc:
        summary["best_dev_label_acc"] = -best[0]
    try:
        for name, part in (("dev", dev_eval), ("test", test_eval)):
            if not part:
                continue
            if name == "dev" and kept_dev_texts and cfg.beam == 1:
                preds = kept_dev_texts  # the kept evaluation generated them, greedily, with this very adapter
            else:
                preds = predict(model, tok, task, part, cfg.system, cfg.max_len, cfg.beam, cfg.max_new_tokens,
                                cfg.eval_batch_size, cfg.skip_long, shown(f"{name} "))
            kept = [(ex, pred) for ex, pred in zip(part, preds) if pred is not None]  # None: too long, skipped
            skipped[f"{name} predictions"] = len(part) - len(kept)
            summary[name] = score(task, [pred for _, pred in kept], [ex for ex, _ in kept])
            note = f"; {skipped[f'{name} predictions']} too long, skipped" if cfg.skip_long else ""
            progress.print(f"{name} {METRIC[task]}: {summary[name][METRIC[task]]:.2f} ({len(kept)} examples{note})")
            if rank == 0:  # --shard: every rank generates (each forward needs them all), rank 0 writes
                runs.save_predictions(kept, out / f"predictions_{name}.jsonl")
    except KeyboardInterrupt:
        progress.print(f"interrupted while evaluating: the trained adapter is {adapter_path} (no summary yet); the "
                       "same command with --resume evaluates it again")
        raise Stopped from None
    finally:
        progress.end()
    if rank == 0:
        runs.save_summary(summary, out / "summary.json")
        print(f"adapter: {adapter_path}\nsummary: {out / 'summary.json'}", flush=True)
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
        distributed.finish()
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
