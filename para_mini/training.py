# The training step and what feeds it, shared by train.py, the lab and the training benchmark: examples as
# (prompt, response) token ids, batches whose loss covers the response tokens only, the loss itself, the data order
# of every step, the learning-rate schedule, and the predictions an adapter is scored on.
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .data import load_task, split, truncate
from .generation import generate_texts
from .metrics import label_first_accuracy

# How much each task may generate at evaluation: labels are a word or two, the rest are free text.
MAX_NEW_TOKENS = {"gsm8k": 256, "e2e": 96, "wikisql": 96, "alpaca": 256, "generic": 128, "squad": 32,
                  "record": 32}


def load_splits(data, dev, test, task, seed, max_train=None, no_test=False):
    """-> (task, train, dev, test examples): the files given, a seeded 10% of `data` as the dev set without `dev`,
    and another 10% as the test set when neither `dev` nor `test` is given, nor no_test (which splits `data` exactly
    as with a `test` file, and reads none); test is None when there is none."""
    task, train_ex = load_task(data, task)
    dev_ex = load_task(dev, task)[1] if dev else None
    test_ex = load_task(test, task)[1] if test else None
    if dev_ex is None:
        train_ex, dev_ex, split_test = split(train_ex, 0.1, 0.0 if test_ex or dev or no_test else 0.1, seed=seed)
        test_ex = test_ex if test_ex is not None else (split_test or None)
    if max_train:
        train_ex = [train_ex[i] for i in epoch_order(len(train_ex), -1, seed)[:max_train]]
    for name, part in (("train", train_ex), ("dev", dev_ex)):
        if not part:
            raise ValueError(f"the {name} split is empty: give more data or a --{'data' if name == 'train' else name}"
                             " file")
    return task, train_ex, dev_ex, test_ex


def tokenize(examples, tok, max_len, system, budget=None, skip_long=False, context=None):
    """(prompt_ids, response_ids) per example, passages shortened so the whole example fits in max_len; with a
    generation budget, the prompt alone is fitted into max_len - budget (evaluation: the response is generated).
    -> (pairs, passages cut, indices of the examples left out as too long: only with skip_long, else an error)."""
    # the tokens an example takes: prompt and response, or with a budget the prompt and the tokens to generate
    size = (lambda ids: sum(map(len, ids))) if budget is None else (lambda ids: len(ids[0]) + budget)
    count = lambda q, r: size(tok.encode_chat(q, r, system))
    out, cut, skipped = [], 0, []
    for i, ex in enumerate(examples):
        ids = tok.encode_chat(ex.query, ex.response, system)
        if size(ids) <= max_len:  # most examples fit as they are: encoded once
            out.append(ids)
            continue
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


def loss_sum(model, tokens, targets, lens, autocast):
    """Summed cross-entropy over the response tokens; only their positions go through the LM head (a 512-token
    BoolQ example has a one-word answer: this saves 8 x 512 x 32000 fp32 logits and their gradient on 7B)."""
    scored = targets != -100
    with autocast:
        logits = model(tokens, prompt_lens=lens, logits_at=scored)
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum")


@torch.no_grad()
def dev_loss(model, pairs, pad_id, device, autocast, batch_size, show=None):
    """The mean loss per response token over `pairs`; show(what, done, total) follows its progress."""
    total, n = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        tokens, targets, lens = collate(pairs[i:i + batch_size], pad_id, device)
        total += loss_sum(model, tokens, targets, lens, autocast).item()
        n += (targets != -100).sum().item()
        if show is not None:
            show("dev loss", min(i + batch_size, len(pairs)), len(pairs))
    return total / n


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


def lr_at(step, total, lr, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then linear decay to 0."""
    warmup_steps = max(1, math.ceil(warmup * total))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total - step) / max(1, total - warmup_steps))


def predict(model, tok, task, examples, system, max_len, beam, max_new_tokens=None, batch_size=16, skip_long=False,
            show=None):
    """Generated text for each example (greedy for beam 1, else beam search as in the paper); None for an example
    too long to fit, left out with skip_long. max_new_tokens: default, the task's (MAX_NEW_TOKENS)."""
    budget = max_new_tokens or MAX_NEW_TOKENS.get(task, 8)
    max_len = min(max_len, model.args.max_seq_len)
    pairs, _, skipped = tokenize(examples, tok, max_len, system, budget, skip_long, model.args.max_seq_len)
    prompts, texts, skipped = [p for p, _ in pairs], [], set(skipped)
    for i in range(0, len(prompts), batch_size):  # a batch at a time, to show progress
        texts += generate_texts(model, tok, prompts[i:i + batch_size], max_new_tokens=budget, beam=beam,
                                batch_size=batch_size)
        if show is not None:
            show("predictions", len(texts), len(prompts))
    texts = iter(texts)
    return [None if i in skipped else next(texts) for i in range(len(examples))]


def label_accuracy(model, tok, task, examples, system, max_len, max_new_tokens=None, batch_size=16, skip_long=False,
                   show=None):
    """Greedy answers to labelled examples and the percent whose first label is the gold one (metrics.label_first)
    -> (accuracy, the answers: None for an example too long to fit, left out with skip_long)."""
    texts = predict(model, tok, task, examples, system, max_len, 1, max_new_tokens, batch_size, skip_long, show)
    kept = [(t, ex.response) for t, ex in zip(texts, examples) if t is not None]
    return label_first_accuracy(task, *map(list, zip(*kept))), texts
