# Decoding with the explicit KV cache: greedy, sampling and beam search, for a batch of requests that may differ in
# prompt length (left padding) and adapter (serving.Tenants: each row runs with its own tenant's weights).
#
# Every request's prompt is run once (the prefill): that is where PARA's vector generators pool it, and the per-row
# vectors stay in the cache beside the keys and values. Each decoding step then feeds one token per row; the vector
# generator is not called again. The rows never change during a batch: a finished request's row goes on being
# decoded and is ignored, and beam search moves hypotheses between the rows of their request in place. So every
# decoding step has the same shapes, and with fast=True it is captured once and replayed from a CUDA graph (fast.py).
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .fast import decode_step
from .cache import KVCache
from .model import Transformer


@dataclass
class Request:
    prompt: list  # token ids, BOS included: tokenizer.encode(text, bos=True) or tokenizer.encode_chat(query)[0]
    adapter: Optional[str] = None  # a tenant's name (generate's tenants); None: the model as it is
    max_new_tokens: int = 64
    seed: Optional[int] = None  # sampling: this request's own random stream (None: generate's seed)


@dataclass
class Result:
    tokens: list = field(default_factory=list)  # the generated ids, eos left out (beam search: the best beam's)
    stop: Optional[str] = None  # "eos" or "length"
    beams: list = field(default_factory=list)  # beam search: the num_return best as (tokens, score), best first
    error: Optional[str] = None  # why this request was refused; the other requests still ran


def check(model: Transformer, r: Request, tenants=None) -> Optional[str]:
    """What is wrong with a request, or None."""
    n, ctx = len(r.prompt), model.args.max_seq_len
    if n == 0:
        return "empty prompt: a request needs at least one token (BOS)"
    if r.max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {r.max_new_tokens}"
    if n + r.max_new_tokens > ctx:
        return (f"prompt of {n} tokens + max_new_tokens {r.max_new_tokens} exceeds the model's context of {ctx} "
                f"tokens: shorten the prompt or ask for at most {max(ctx - n, 0)} new tokens")
    if r.adapter is not None and (tenants is None or r.adapter not in tenants):
        return f"unknown adapter {r.adapter!r}; loaded: {', '.join(sorted(tenants or ())) or 'none'}"
    bad = [t for t in r.prompt if not (isinstance(t, int) and 0 <= t < model.args.vocab_size)]
    if bad:
        return f"prompt holds ids outside the vocabulary of {model.args.vocab_size}: {bad[:5]}"
    return None


def serve(tenants, names: list):
    """The model with each row's adapter installed (serving.Tenants), for as long as the batch runs."""
    return nullcontext() if tenants is None else tenants.rows(names)


def new_cache(model: Transformer, batch_size: int, max_len: int, fast: bool, compile: bool):
    """(a cache of batch_size rows and max_len positions, and the captured decoding step when fast, else None)."""
    if not fast:
        return model.new_cache(batch_size, max_len), None
    step = decode_step(model, batch_size, -(-max_len // 16) * 16, compile)  # a multiple of 16: fewer kernel shapes
    return step.reuse(), step


def prefill(model: Transformer, batch: list, cache: KVCache):
    """Left-pad the prompts into one batch and run it once into the cache's first rows -> next-token logits
    [len(batch), vocab] in fp32."""
    device = model.output.weight.device
    lens = torch.tensor([len(r.prompt) for r in batch], device=device)
    T = int(lens.max())
    tokens = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # id 0 at the padding: it is masked out
    for b, r in enumerate(batch):
        tokens[b, T - len(r.prompt):] = torch.tensor(r.prompt, device=device)
    pad = None if all(len(r.prompt) == T for r in batch) else T - lens  # None: no mask at all when decoding
    return model(tokens, prompt_lens=lens, pad=pad, cache=cache, logits_at=slice(-1, None))[:, -1].float()


def next_logits(model: Transformer, cache: KVCache, step, tokens):
    """One decoding step: tokens [B], one per row -> next-token logits [B, vocab] in fp32."""
    return step(tokens) if step is not None else model(tokens[:, None], cache=cache)[:, -1].float()


def run_valid(model, requests, batch_size, decode, tenants):
    """Refuse the bad requests one by one, decode the good ones in batches of batch_size -> a Result each."""
    results = [Result(error=check(model, r, tenants)) for r in requests]
    ok = [i for i, res in enumerate(results) if res.error is None]
    for start in range(0, len(ok), batch_size):
        chunk = ok[start:start + batch_size]
        for i, res in zip(chunk, decode(chunk)):
            results[i] = res
    return results


# ------------------------------------------------------------------------------------------ greedy, sampling

def pick(logits, temperature: float, top_k: int, top_p: float, generators):
    """The next token of each row [B]: argmax at temperature 0, else a sample from the filtered distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        # the smallest set of most likely tokens whose probability reaches top_p (Meta's sample_top_p)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # one generator per request, so a request samples the same tokens whatever else shares its batch
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


@torch.no_grad()
def generate(model: Transformer, requests: list, eos_id: Optional[int] = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
             stream: Optional[Callable[[int, int], None]] = None, tenants=None, fast: bool = False,
             compile: bool = False) -> list:
    """Greedy decoding (temperature 0) or sampling, one Result per request, in order.

    Each request stops at eos_id (None: never) or after its max_new_tokens. stream(request index, token id) is
    called for every generated token as soon as it is chosen (eos excluded). tenants: the serving.Tenants that
    requests name. fast: replay the decoding step from a CUDA graph on a GPU (compile: torch.compile it first).
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be >= 0, top_k {top_k} >= 0, top_p {top_p} in (0, 1]")

    def decode(indices):
        batch = [requests[i] for i in indices]
        device = model.output.weight.device
        generators = [torch.Generator(device).manual_seed(seed if r.seed is None else r.seed) for r in batch]
        max_len = max(len(r.prompt) for r in batch) + max(r.max_new_tokens for r in batch)
        with serve(tenants, [r.adapter for r in batch]):
            cache, step = new_cache(model, len(batch), max_len, fast, compile)
            logits = prefill(model, batch, cache)
            if step is not None:
                step.load()
            results = [Result() for _ in batch]
            alive = list(range(len(batch)))  # the rows (requests) still generating
            tokens = torch.zeros(len(batch), dtype=torch.long, device=device)  # finished rows: token 0, ignored
            while True:
                everyone = len(alive) == len(batch)
                rows = None if everyone else torch.tensor(alive, device=device)
                live = logits if everyone else logits.index_select(0, rows)
                picked = pick(live, temperature, top_k, top_p, [generators[b] for b in alive])
                keep = []
                for b, t in zip(alive, picked.tolist()):
                    res = results[b]
                    if t == eos_id:
                        res.stop = "eos"
                        continue
                    res.tokens.append(t)
                    if stream:
                        stream(indices[b], t)
                    if len(res.tokens) == batch[b].max_new_tokens:
                        res.stop = "length"
                    else:
                        keep.append(b)
                if not keep:
                    return results
                if everyone:
                    tokens = picked
                else:  # finished rows keep decoding their last token, ignored
                    tokens.index_copy_(0, rows, picked)
                alive = keep
                logits = next_logits(model, cache, step, tokens)

    return run_valid(model, requests, batch_size, decode, tenants)


# ---------------------------------------------------------------------------------------------- beam search

@torch.no_grad()
def beam_search(model: Transformer, requests: list, beam: int = 3, length_penalty: float = 1.0,
                num_return: int = 1, eos_id: Optional[int] = None, batch_size: int = 16, tenants=None,
                fast: bool = False, compile: bool = False) -> list:
    """Beam search, one Result per request with its num_return best hypotheses and their scores.

    Hugging Face's convention (num_beams, early_stopping=False), so beam 1 is greedy decoding:
      - a hypothesis's score is its sum of log-probabilities / length ** length_penalty, the length counting the
        generated tokens, eos included;
      - each step ranks the 2 * beam best continuations of all beams; among the first `beam` of them, those ending
        in eos (or reaching max_new_tokens) are set aside as finished, and the best `beam` that did not end go on;
      - a request stops when `beam` hypotheses have finished and the best running one, scored at its current
        length, can no longer beat the worst of them, or at max_new_tokens.
    Request b's hypotheses live in the cache rows b * beam ... b * beam + beam - 1. tenants, fast, compile: as for
    generate.
    """
    if beam < 1 or not 1 <= num_return <= beam:
        raise ValueError(f"beam {beam} must be >= 1 and num_return {num_return} between 1 and the beam")
    W = beam

    def decode(indices):
        batch = [requests[i] for i in indices]
        B, device = len(batch), model.output.weight.device
        names = [r.adapter for r in batch]
        max_len = max(len(r.prompt) for r in batch) + max(r.max_new_tokens for r in batch)
        cache, step = new_cache(model, B * W, max_len, fast, compile)
        with serve(tenants, names):
            logits = prefill(model, batch, cache)  # one row per request
        cache.reorder(torch.arange(B, device=device).repeat_interleave(W))  # each request's row to its W beams
        logp = logits.log_softmax(-1).repeat_interleave(W, 0)  # [B * W, vocab]
        V = logp.shape[-1]
        # per request: running hypotheses as (tokens, sum of log-probs); only the first is live at the start
        running = [[([], 0.0)] + [([], -math.inf)] * (W - 1) for _ in batch]
        finished = [[] for _ in batch]  # (score, tokens, stop), best first, at most W
        alive, n = list(range(B)), 0
        with serve(tenants, [a for a in names for _ in range(W)]):
            if step is not None:
                step.load()
            while True:
                sums = torch.tensor([[s for _, s in running[b]] for b in alive], device=device)
                live = logp.view(B, W, V)
                live = live if len(alive) == B else live.index_select(0, torch.tensor(alive, device=device))
                totals = (live + sums[..., None]).view(len(alive), W * V)
                top, idx = totals.topk(min(2 * W, W * V), dim=-1)
                src, tokens, still = list(range(B * W)), [0] * (B * W), []  # finished requests' rows stay as they are
                for b, tops, ids in zip(alive, top.tolist(), idx.tolist()):
                    last = n + 1 == batch[b].max_new_tokens
                    going = []
                    for rank, (total, i) in enumerate(zip(tops, ids)):
                        if total == -math.inf:
                            break  # the continuations of beams that are not live yet
                        w, t = divmod(i, V)
                        seq = running[b][w][0] + [t]
                        if t == eos_id or last:
                            if rank < W:
                                score = total / (n + 1) ** length_penalty
                                finished[b].append((score, seq, "eos" if t == eos_id else "length"))
                        elif len(going) < W:
                            going.append((w, seq, total))
                    finished[b] = sorted(finished[b], key=lambda f: -f[0])[:W]
                    done = last or not going or (len(finished[b]) == W and
                                                 going[0][2] / (n + 1) ** length_penalty <= finished[b][-1][0])
                    if done:
                        continue
                    going += [(0, [], -math.inf)] * (W - len(going))  # dead rows keep the block W wide
                    running[b] = [(seq, total) for _, seq, total in going]
                    for w, (from_w, seq, _) in enumerate(going):
                        src[b * W + w], tokens[b * W + w] = b * W + from_w, seq[-1] if seq else 0
                    still.append(b)
                if not still:
                    break
                if src != list(range(B * W)):  # hypotheses move with their keys and values
                    cache.reorder(torch.tensor(src, device=device))
                logits = next_logits(model, cache, step, torch.tensor(tokens, device=device))
                logp, alive, n = logits.log_softmax(-1), still, n + 1

        results = []
        for fin in finished:
            beams = [(seq[:-1] if stop == "eos" else seq, score) for score, seq, stop in fin[:num_return]]
            results.append(Result(tokens=beams[0][0], stop=fin[0][2], beams=beams))
        return results

    return run_valid(model, requests, batch_size, decode, tenants)


# ------------------------------------------------------------------------------------------------ convenience

def generate_texts(model: Transformer, tok, prompts: list, max_new_tokens: int = 64, beam: int = 1,
                   batch_size: int = 16, length_penalty: float = 1.0) -> list:
    """Decoded text for each prompt (token ids): greedy for beam 1, else beam search, with the model as it is (its
    adapter, if one is attached)."""
    requests = [Request(list(p), None, max_new_tokens) for p in prompts]
    if beam == 1:
        results = generate(model, requests, eos_id=tok.eos_id, batch_size=batch_size)
    else:
        results = beam_search(model, requests, beam=beam, length_penalty=length_penalty, eos_id=tok.eos_id,
                              batch_size=batch_size)
    errors = [f"prompt {i}: {r.error}" for i, r in enumerate(results) if r.error]
    if errors:
        raise ValueError("; ".join(errors[:5]))
    return [tok.decode(r.tokens) for r in results]
