"""Generate text with LLaMA-2 and any number of adapters, with an explicit KV cache.

    python generate.py --weights weights/Llama-2-7b-hf --prompt "Write a haiku about autumn."
    python generate.py --weights weights/Llama-2-7b-hf --adapter runs/boolq-para/adapter.safetensors \\
        --prompt "Is the sky blue?" --beam 3
    python generate.py --weights weights/Llama-2-7b-hf --adapter a=a.safetensors --adapter b=b.safetensors \\
        --requests requests.jsonl --output answers.jsonl

A single --prompt streams its answer to the terminal (greedy or sampling; beam search prints its beams at the
end). --requests reads one JSON object per line, {"prompt": "...", "adapter": "a" or null}, where a line may
also set "id" (copied to its answer) and override system, chat, max_new_tokens, temperature, top_k, top_p,
seed, beam, length_penalty and num_return. Requests with the same decoding settings are batched together, each
row with its own adapter. Every non-blank line gets one answer line, in order: the request with "output" and
"stop" ("eos" or "length") added, and "beams" with their scores for beam search; or with "error" (file:line and
why) when that line could not be served, while the other lines still are.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from para_mini import find_tokenizer, load_adapter, load_model, load_tokenizer
from para_mini.generation import Request, beam_search, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what a request line may override, and the type each must have
OVERRIDES = {"system": str, "chat": bool, "max_new_tokens": int, "temperature": (int, float), "top_k": int,
             "top_p": (int, float), "seed": int, "beam": int, "length_penalty": (int, float), "num_return": int}
SETTINGS = ("temperature", "top_k", "top_p", "beam", "length_penalty", "num_return")  # shared by a batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True, help="checkpoint: HF or Meta directory, llama2.c .bin / .pt")
    g.add_argument("--tokenizer", help="tokenizer.model (default: tokenizer.model inside or beside --weights)")
    g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter .safetensors file, repeatable; its name is NAME or the file's stem")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("input and output")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt, answered on the terminal (with the --adapter given, if any)")
    src.add_argument("--requests", help="a .jsonl file of requests (see above)")
    g.add_argument("--output", help="where --requests' answers go, one JSON line each (default: stdout)")
    g.add_argument("--no-chat", dest="chat", action="store_false",
                   help="feed the raw text after BOS instead of the LLaMA-2 chat template")
    g.add_argument("--system", help="system prompt inside the chat template (default: none)")
    g.add_argument("--batch-size", type=int, default=16, help="requests decoded together (default 16)")
    g = p.add_argument_group("decoding (defaults for every request)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="token budget per answer (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this "
                   "much probability (default 1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed; a request's output depends only on its "
                   "own prompt, adapter and seed (default 0)")
    g.add_argument("--beam", type=int, default=1, help="beam size; > 1: beam search (default 1)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum of log-probs / length ** this (default 1.0, as Hugging Face)")
    g.add_argument("--num-return", type=int, default=1, help="beam search: how many best hypotheses to return")
    args = p.parse_args(argv)
    if args.output and not args.requests:
        p.error("--output goes with --requests; a --prompt is answered on the terminal")
    if args.prompt is not None and len(args.adapter) > 1:
        p.error("--prompt uses at most one --adapter; mix adapters with --requests")
    return args


def load(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = load_model(args.weights, dtype=dtype, device=device)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(args.weights))
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model {model.args.vocab_size}: "
                         "pass the --tokenizer the weights were trained with")
    names = []
    for spec in args.adapter:
        name, path = spec.split("=", 1) if "=" in spec else (None, spec)
        names.append(load_adapter(model, path, name))
    return model, tok, names


def encode(tok, prompt, chat, system):
    return tok.encode_chat(prompt, system=system)[0] if chat else tok.encode(prompt, bos=True)


def read_requests(path, defaults):
    """Each non-blank line of a .jsonl file -> (file:line, its object or None, its settings or None, its error)."""
    lines = Path(path).read_text().splitlines()
    out = []
    for n, text in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            out.append((where, None, None, f"{where}: not a JSON object: {e}"))
            continue
        if not isinstance(obj, dict):
            out.append((where, None, None, f"{where}: expected a JSON object, got {type(obj).__name__}"))
            continue
        unknown = sorted(set(obj) - {"prompt", "adapter", "id", *OVERRIDES})
        wrong = [k for k, t in OVERRIDES.items()
                 if k in obj and (not isinstance(obj[k], t) or (t is not bool and isinstance(obj[k], bool)))]
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            error = "a non-empty \"prompt\" string is required (empty prompt)"
        elif not (obj.get("adapter") is None or isinstance(obj["adapter"], str)):
            error = "\"adapter\" must be an adapter's name or null"
        elif unknown:
            error = f"unknown field(s) {unknown}; allowed: prompt, adapter, id, {', '.join(OVERRIDES)}"
        elif wrong:
            error = f"field(s) {wrong} have the wrong type"
        else:
            out.append((where, obj, {**defaults, **{k: obj[k] for k in OVERRIDES if k in obj}}, None))
            continue
        out.append((where, obj, None, f"{where}: {error}"))
    return out


def decode(model, tok, requests, s, batch_size, stream=None):
    if s["beam"] < 1:
        raise ValueError(f"beam {s['beam']} must be at least 1 (1: greedy or sampling)")
    if s["beam"] > 1 or s["num_return"] > 1:
        if s["temperature"] > 0:
            raise ValueError("beam search does not sample: a temperature goes with beam 1")
        return beam_search(model, requests, s["beam"], s["length_penalty"], s["num_return"], tok.eos_id,
                           batch_size)
    return generate(model, requests, tok.eos_id, s["temperature"], s["top_k"], s["top_p"], batch_size=batch_size,
                    stream=stream)


def serve(model, tok, entries, args):
    """Answer every entry, batching those with the same settings -> one output object per entry."""
    outputs = [None] * len(entries)
    groups = {}
    for i, (where, obj, s, error) in enumerate(entries):
        if error:
            outputs[i] = {**(obj or {}), "error": error}
        else:
            groups.setdefault(tuple(s[k] for k in SETTINGS), []).append(i)
    for key, members in groups.items():
        s = dict(zip(SETTINGS, key))
        requests = []
        for i in members:
            where, obj, r, _ = entries[i]
            requests.append(Request(encode(tok, obj["prompt"], r["chat"], r["system"]), obj.get("adapter"),
                                    r["max_new_tokens"], r["seed"]))
        try:
            results = decode(model, tok, requests, s, args.batch_size)
        except ValueError as e:  # settings that no request of this group can run with (e.g. num_return > beam)
            for i in members:
                outputs[i] = {**entries[i][1], "error": f"{entries[i][0]}: {e}"}
            continue
        for i, res in zip(members, results):
            where, obj, _, _ = entries[i]
            if res.error:
                outputs[i] = {**obj, "error": f"{where}: {res.error}"}
            else:
                outputs[i] = {**obj, "output": tok.decode(res.tokens), "stop": res.stop}
                if res.beams:
                    outputs[i]["beams"] = [{"output": tok.decode(t), "score": sc} for t, sc in res.beams]
    return outputs


def answer_prompt(model, tok, names, args):
    request = Request(encode(tok, args.prompt, args.chat, args.system), names[0] if names else None,
                      args.max_new_tokens, args.seed)
    generated, shown = [], ""

    def stream(_, token):  # decode the whole answer each time: SentencePiece spaces depend on the neighbours
        nonlocal shown
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a character spelled as several byte tokens
            print(text[len(shown):], end="", flush=True)
            shown = text

    [res] = decode(model, tok, [request], {k: getattr(args, k) for k in SETTINGS}, 1, stream)
    if res.error:
        raise ValueError(res.error)
    if res.beams:  # beam search: the answers are known only at the end
        for tokens, score in res.beams:
            print(f"[{score:.4f}] {tok.decode(tokens)}" if args.num_return > 1 else tok.decode(tokens))
    else:
        print(tok.decode(res.tokens)[len(shown):])


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tok, names = load(args)
        if args.prompt is not None:
            return answer_prompt(model, tok, names, args)
        defaults = {k: getattr(args, k) for k in OVERRIDES}
        entries = read_requests(args.requests, defaults)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    outputs = serve(model, tok, entries, args)
    for out in outputs:
        if "error" in out:
            print(f"error: {out['error']}", file=sys.stderr)
    lines = "".join(json.dumps(out, ensure_ascii=False) + "\n" for out in outputs)
    if args.output:
        Path(args.output).write_text(lines)
    else:
        sys.stdout.write(lines)
    return outputs


if __name__ == "__main__":
    main()
