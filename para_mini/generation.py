# Decoding with the explicit KV cache: greedy, sampling and beam search, for a batch of requests that may differ in
# prompt length (left padding) and adapter (each row runs with its own tenant's weights: serving.py).
#
# Every request's prompt is run once (the prefill): that is where PARA's vector generators pool it, and the
# resulting per-row vectors (and LoRA factors, (IA)^3 vectors) stay in the cache beside the keys and values. Each
# decoding step then feeds one token per row; the vector generator is not called again. With fast=True the decoding
# steps run on fast.py's static-shape step instead (a CUDA graph on a GPU), from the same prefill.
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .fast import fast_decoder
from .model import Transformer


@dataclass
class Request:
    prompt: list  # token ids, BOS included: tokenizer.encode(text, bos=True) or tokenizer.encode_chat(query)[0]
    adapter: Optional[str] = None  # a name in model.tenants; None: the base model
    max_new_tokens: int = 64
    seed: Optional[int] = None  # sampling: this request's own random stream (None: generate's seed)


@dataclass
class Result:
    tokens: list = field(default_factory=list)  # the generated ids, eos left out (beam search: the best beam's)
    stop: Optional[str] = None  # "eos" or "length"
    beams: list = field(default_factory=list)  # beam search: the num_return best as (tokens, score), best first
    error: Optional[str] = None  # why this request was refused; the other requests still ran


def check(model: Transformer, r: Request) -> Optional[str]:
    """What is wrong with a request, or None."""
    n, ctx = len(r.prompt), model.args.max_seq_len
    if n == 0:
        return "empty prompt: a request needs at least one token (BOS)"
    if r.max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {r.max_new_tokens}"
    if n + r.max_new_tokens > ctx:
        return (f"prompt of {n} tokens + max_new_tokens {r.max_new_tokens} exceeds the model's context of {ctx} "
                f"tokens: shorten the prompt or ask for at most {max(ctx - n, 0)} new tokens")
    if r.adapter is not None and r.adapter not in model.tenants:
        return f"unknown adapter {r.adapter!r}; attached: {', '.join(sorted(model.tenants)) or 'none'}"
    bad = [t for t in r.prompt if not (isinstance(t, int) and 0 <= t < model.args.vocab_size)]
    if bad:
        return f"prompt holds ids outside the vocabulary of {model.args.vocab_size}: {bad[:5]}"
    return None


def prefill(model: Transformer, batch: list):
    """Left-pad the prompts into one batch and run it once -> (cache, next-token logits [B, vocab] in fp32)."""
    device = model.output.weight.device
    lens = torch.tensor([len(r.prompt) for r in batch], device=device)
    T = int(lens.max())
    tokens = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # id 0 at the padding: it is masked out
    for b, r in enumerate(batch):
        tokens[b, T - len(r.prompt):] = torch.tensor(r.prompt, device=device)
    cache = model.new_cache(len(batch), T + max(r.max_new_tokens for r in batch))
    pad = None if all(len(r.prompt) == T for r in batch) else T - lens  # None: no mask at all when decoding
    logits = model(tokens, prompt_lens=lens, pad=pad, cache=cache, adapters=[r.adapter for r in batch],
                   logits_at=slice(-1, None))
    return cache, logits[:, -1].float()


def run_valid(model, requests, batch_size, decode):
    """Refuse the bad requests one by one, decode the good ones in batches of batch_size -> a Result each."""
    results = [Result(error=check(model, r)) for r in requests]
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
             stream: Optional[Callable[[int, int], None]] = None, fast: bool = False, compile: bool = False) -> list:
    """Greedy decoding (temperature 0) or sampling, one Result per request, in order.

    Each request stops at eos_id (None: never) or after its max_new_tokens. stream(request index, token id) is
    called for every generated token as soon as it is chosen (eos excluded). fast: decode with fast.py's static
    step (a CUDA graph on a GPU; compile: torch.compile it too), the same tokens as the eager path.
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be >= 0, top_k {top_k} >= 0, top_p {top_p} in (0, 1]")

    def decode(indices):
        batch = [requests[i] for i in indices]
        device = model.output.weight.device
        generators = [torch.Generator(device).manual_seed(seed if r.seed is None else r.seed) for r in batch]
        cache, logits = prefill(model, batch)
        results = [Result() for _ in batch]
        alive = list(range(len(batch)))  # the batch rows still generating, in the cache's row order
        rows, decoder = torch.arange(len(batch), device=device), None  # fast: each alive request's row, fixed
        while True:
            tokens = pick(logits, temperature, top_k, top_p, [generators[b] for b in alive])
            keep = []
            for row, (b, t) in enumerate(zip(alive, tokens.tolist())):
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
                    keep.append(row)
            if not keep:
                return results
            if len(keep) < len(alive):  # drop the finished rows from the cache rather than decode them further
                keep_t = torch.tensor(keep, device=device)
                if not fast:  # the static step keeps every row: it decodes the finished ones and ignores them
                    cache.reorder(keep_t)
                tokens, rows = tokens[keep_t], rows[keep_t]
                alive = [alive[row] for row in keep]
            if fast:
                decoder = decoder or fast_decoder(model, cache, compile)
                logits = decoder.step(rows, tokens)
            else:
                logits = model(tokens[:, None], cache=cache)[:, -1].float()

    return run_valid(model, requests, batch_size, decode)


# ---------------------------------------------------------------------------------------------- beam search

@torch.no_grad()
def beam_search(model: Transformer, requests: list, beam: int = 3, length_penalty: float = 1.0,
                num_return: int = 1, eos_id: Optional[int] = None, batch_size: int = 16, fast: bool = False,
                compile: bool = False) -> list:
    """Beam search, one Result per request with its num_return best hypotheses and their scores.

    Hugging Face's convention (num_beams, early_stopping=False), so beam 1 is greedy decoding:
      - a hypothesis's score is its sum of log-probabilities / length ** length_penalty, the length counting the
        generated tokens, eos included;
      - each step ranks the 2 * beam best continuations of all beams; among the first `beam` of them, those ending
        in eos (or reaching max_new_tokens) are set aside as finished, and the best `beam` that did not end go on;
      - a request stops when `beam` hypotheses have finished and the best running one, scored at its current
        length, can no longer beat the worst of them, or at max_new_tokens.
    fast, compile: as for generate; the static cache keeps each request's W rows in place and reorders them there.
    """
    if beam < 1 or not 1 <= num_return <= beam:
        raise ValueError(f"beam {beam} must be >= 1 and num_return {num_return} between 1 and the beam")
    W = beam

    def decode(indices):
        batch = [requests[i] for i in indices]
        device = model.output.weight.device
        cache, logits = prefill(model, batch)
        cache.reorder(torch.arange(len(batch), device=device).repeat_interleave(W))  # W rows per request
        logp = logits.log_softmax(-1).repeat_interleave(W, 0)  # [alive * W, vocab]
        V = logp.shape[-1]
        # per request: running hypotheses as (tokens, sum of log-probs); only the first is live at the start
        running = [[([], 0.0)] + [([], -math.inf)] * (W - 1) for _ in batch]
        finished = [[] for _ in batch]  # (score, tokens, stop), best first, at most W
        alive, step, decoder = list(range(len(batch))), 0, None
        while True:
            sums = torch.tensor([[s for _, s in running[b]] for b in alive], device=device)
            totals = (logp.view(len(alive), W, V) + sums[..., None]).view(len(alive), W * V)
            top, idx = totals.topk(min(2 * W, W * V), dim=-1)
            rows, tokens, still = [], [], []
            for k, (b, tops, ids) in enumerate(zip(alive, top.tolist(), idx.tolist())):
                last = step + 1 == batch[b].max_new_tokens
                going = []
                for rank, (total, i) in enumerate(zip(tops, ids)):
                    if total == -math.inf:
                        break  # the continuations of beams that are not live yet
                    w, t = divmod(i, V)
                    seq = running[b][w][0] + [t]
                    if t == eos_id or last:
                        if rank < W:
                            score = total / (step + 1) ** length_penalty
                            finished[b].append((score, seq, "eos" if t == eos_id else "length"))
                    elif len(going) < W:
                        going.append((w, seq, total))
                finished[b] = sorted(finished[b], key=lambda f: -f[0])[:W]
                done = last or not going or (len(finished[b]) == W and
                                             going[0][2] / (step + 1) ** length_penalty <= finished[b][-1][0])
                if done:
                    continue
                going += [(0, [], -math.inf)] * (W - len(going))  # dead rows keep the block W wide
                running[b] = [(seq, total) for _, seq, total in going]
                block = b if fast else k  # the request's W rows start at block * W (the static cache never drops)
                rows += [block * W + w for w, _, _ in going]
                tokens += [seq[-1] if seq else 0 for _, seq, _ in going]
                still.append(b)
            if not still:
                break
            rows, tokens = torch.tensor(rows, device=device), torch.tensor(tokens, device=device)
            if fast:
                decoder = decoder or fast_decoder(model, cache, compile)
                dst = torch.tensor([b * W + w for b in still for w in range(W)], device=device)
                decoder.reorder(dst, rows)
                logits = decoder.step(dst, tokens)
            else:
                cache.reorder(rows)
                logits = model(tokens[:, None], cache=cache)[:, -1].float()
            logp, alive, step = logits.log_softmax(-1), still, step + 1

        results = []
        for fin in finished:
            beams = [(seq[:-1] if stop == "eos" else seq, score) for score, seq, stop in fin[:num_return]]
            results.append(Result(tokens=beams[0][0], stop=fin[0][2], beams=beams))
        return results

    return run_valid(model, requests, batch_size, decode)


# ------------------------------------------------------------------------------------------------ convenience

def generate_texts(model: Transformer, tok, prompts: list, max_new_tokens: int = 64, beam: int = 1,
                   batch_size: int = 16, length_penalty: float = 1.0) -> list:
    """Decoded text for each prompt (token ids): greedy for beam 1, else beam search. Every row gets the model's
    one attached adapter, or the base model when none is attached (as model(tokens) does)."""
    if len(model.tenants) > 1:
        raise ValueError(f"{len(model.tenants)} adapters are attached ({', '.join(model.tenants)}): "
                         "call generate / beam_search with a Request per prompt naming its adapter")
    adapter = next(iter(model.tenants), None)
    requests = [Request(list(p), adapter, max_new_tokens) for p in prompts]
    if beam == 1:
        results = generate(model, requests, eos_id=tok.eos_id, batch_size=batch_size)
    else:
        results = beam_search(model, requests, beam=beam, length_penalty=length_penalty, eos_id=tok.eos_id,
                              batch_size=batch_size)
    errors = [f"prompt {i}: {r.error}" for i, r in enumerate(results) if r.error]
    if errors:
        raise ValueError("; ".join(errors[:5]))
    return [tok.decode(r.tokens) for r in results]
