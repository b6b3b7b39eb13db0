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
row with its own adapter. Every non-blank line gets one answer line: the request with "line" (its line number),
"output" and "stop" ("eos" or "length") added, and "beams" with their scores for beam search; or with "error"
(file:line and why) when that line could not be served, while the other lines still are.

Answers are written as soon as their batch is done (in file order among requests with the same settings), with
progress on stderr. Run the same command again after an interruption: the requests --output already answers (by
"id", else by line) are skipped, and those that failed are tried again. --fast replays the decoding step from a
CUDA graph on a GPU (para_mini/fast.py): the same step, the same answers.
Exit status: 0 every request answered; 1 some failed (the others are answered); 2 nothing could be served (bad
command, weights or file); 130 interrupted (Ctrl-C), with what was finished kept.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from para_mini import Tenants, find_tokenizer, load_model, load_tokenizer
from para_mini.cli import SEED, Parser, Progress, Range, at_least, usable_device
from para_mini.generation import Request, beam_search, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what a request line may override, and the type each must have
OVERRIDES = {"system": str, "chat": bool, "max_new_tokens": int, "temperature": (int, float), "top_k": int,
             "top_p": (int, float), "seed": int, "beam": int, "length_penalty": (int, float), "num_return": int}
SETTINGS = ("temperature", "top_k", "top_p", "beam", "length_penalty", "num_return")  # shared by a batch
# the range of each numeric setting, for its flag and for the same field of a request line
RANGES = {"max_new_tokens": at_least(1), "temperature": at_least(0.0), "top_k": at_least(0),
          "top_p": Range(float, 0.0, 1.0, low_open=True), "seed": SEED, "beam": at_least(1),
          "length_penalty": Range(float), "num_return": at_least(1)}


def parser():
    p = Parser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True, help="checkpoint: HF or Meta directory, llama2.c .bin / .pt")
    g.add_argument("--tokenizer", help="tokenizer.model (default: tokenizer.model inside or beside --weights)")
    g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter .safetensors file, repeatable; its name is NAME or the file's stem")
    g.add_argument("--allow-other-base", action="store_true",
                   help="load an adapter trained on other base weights of the same shape (refused by default)")
    g.add_argument("--device", type=usable_device, default="cuda" if torch.cuda.is_available() else "cpu",
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
    g.add_argument("--batch-size", type=at_least(1), default=16, help="requests decoded together (default 16)")
    g = p.add_argument_group("decoding (defaults for every request)")
    g.add_argument("--max-new-tokens", type=RANGES["max_new_tokens"], default=256,
                   help="token budget per answer (default 256)")
    g.add_argument("--temperature", type=RANGES["temperature"], default=0.0,
                   help="0 (default): greedy; > 0: sampling")
    g.add_argument("--top-k", type=RANGES["top_k"], default=0,
                   help="sample among the k most likely tokens (default 0: all)")
    g.add_argument("--top-p", type=RANGES["top_p"], default=1.0,
                   help="sample among the most likely tokens holding this much probability (default 1: all)")
    g.add_argument("--seed", type=RANGES["seed"], default=0, help="sampling seed; a request's output depends only "
                   "on its own prompt, adapter and seed (default 0)")
    g.add_argument("--beam", type=RANGES["beam"], default=1, help="beam size; > 1: beam search (default 1)")
    g.add_argument("--length-penalty", type=RANGES["length_penalty"], default=1.0,
                   help="beam score = sum of log-probs / length ** this (default 1.0, as Hugging Face)")
    g.add_argument("--num-return", type=RANGES["num_return"], default=1,
                   help="beam search: how many best hypotheses to return, at most --beam (default 1)")
    g.add_argument("--fast", action="store_true", help="replay the decoding step from a CUDA graph on a GPU "
                   "(para_mini/fast.py): the same step, the same tokens")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.output and not args.requests:
        p.error("--output goes with --requests; a --prompt is answered on the terminal")
    if args.prompt is not None and len(args.adapter) > 1:
        p.error("--prompt uses at most one --adapter; mix adapters with --requests")
    if args.prompt is not None and args.num_return > args.beam:  # a request line may set its own beam
        p.error(f"--num-return {args.num_return} asks for more hypotheses than --beam {args.beam} keeps")
    return args


def check_files(args):
    """Every file a flag names is there (an --adapter folder is named as one), before the model loads."""
    if not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights {args.weights}: no such file or folder")
    if args.output and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder: give a .jsonl file to write the answers to")
    for flag, path in [("--tokenizer", args.tokenizer), ("--requests", args.requests)] + \
            [("--adapter", spec.split("=", 1)[-1]) for spec in args.adapter]:
        if path is None:
            continue
        if Path(path).is_dir():
            inside = Path(path) / "adapter.safetensors"
            want = {"--tokenizer": "tokenizer.model", "--requests": "a .jsonl file",
                    "--adapter": f"an adapter .safetensors file{f', such as {inside}' if inside.is_file() else ''}"}
            raise ValueError(f"{flag} {path} is a folder: give {want[flag]}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")


def load(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = load_model(args.weights, dtype=dtype, device=device)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(args.weights))
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model {model.args.vocab_size}: "
                         "pass the --tokenizer the weights were trained with")
    tenants = Tenants(model)  # the adapters, by name; each request's row runs with its own
    for spec in args.adapter:
        name, path = spec.split("=", 1) if "=" in spec else (None, spec)
        tenants.load(path, name, other_base=args.allow_other_base)
    return model, tok, tenants


def encode(tok, prompt, chat, system):
    return tok.encode_chat(prompt, system=system)[0] if chat else tok.encode(prompt, bos=True)


def read_requests(path, defaults):
    """Each non-blank line of a .jsonl file -> (line, file:line, its object or None, its settings or None, its
    error)."""
    lines = Path(path).read_text().splitlines()
    out = []
    for n, text in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            out.append((n, where, None, None, f"{where}: not a JSON object: {e}"))
            continue
        if not isinstance(obj, dict):
            out.append((n, where, None, None, f"{where}: expected a JSON object, got {type(obj).__name__}"))
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
        elif any(k in obj and RANGES[k].problem(obj[k]) for k in RANGES):
            error = "; ".join(f"\"{k}\" {RANGES[k].problem(obj[k])}" for k in RANGES
                              if k in obj and RANGES[k].problem(obj[k]))
        else:
            out.append((n, where, obj, {**defaults, **{k: obj[k] for k in OVERRIDES if k in obj}}, None))
            continue
        out.append((n, where, obj, None, f"{where}: {error}"))
    return out


def decode(model, tok, requests, s, batch_size, tenants, stream=None, fast=False):
    if s["beam"] < 1:
        raise ValueError(f"beam {s['beam']} must be at least 1 (1: greedy or sampling)")
    if s["beam"] > 1 or s["num_return"] > 1:
        if s["temperature"] > 0:
            raise ValueError("beam search does not sample: a temperature goes with beam 1")
        return beam_search(model, requests, s["beam"], s["length_penalty"], s["num_return"], tok.eos_id,
                           batch_size, tenants=tenants, fast=fast)
    return generate(model, requests, tok.eos_id, s["temperature"], s["top_k"], s["top_p"], batch_size=batch_size,
                    stream=stream, tenants=tenants, fast=fast)


def serve(model, tok, tenants, entries, args, write):
    """Answer every entry, batching those with the same settings; each batch's answers go to write(answers) as soon
    as it is done."""
    groups = {}
    for n, where, obj, s, error in entries:
        if error:
            write([{**(obj or {}), "line": n, "error": error}])
        else:
            groups.setdefault(tuple(s[k] for k in SETTINGS), []).append((n, where, obj, s))
    for key, members in groups.items():
        for start in range(0, len(members), args.batch_size):
            batch = members[start:start + args.batch_size]
            requests = [Request(encode(tok, obj["prompt"], r["chat"], r["system"]), obj.get("adapter"),
                                r["max_new_tokens"], r["seed"]) for _, _, obj, r in batch]
            try:
                results = decode(model, tok, requests, dict(zip(SETTINGS, key)), args.batch_size, tenants,
                                 fast=args.fast)
            except ValueError as e:  # settings that no request of this group can run with (e.g. num_return > beam)
                write([{**obj, "line": n, "error": f"{where}: {e}"} for n, where, obj, _ in batch])
                continue
            write([answer(tok, n, where, obj, res) for (n, where, obj, _), res in zip(batch, results)])


def answer(tok, n, where, obj, res):
    if res.error:
        return {**obj, "line": n, "error": f"{where}: {res.error}"}
    out = {**obj, "line": n, "output": tok.decode(res.tokens), "stop": res.stop}
    if res.beams:
        out["beams"] = [{"output": tok.decode(t), "score": sc} for t, sc in res.beams]
    out["new_tokens"] = len(res.tokens)
    return out


def request_key(line, obj):
    # how an answer is matched to its request on a rerun: its "id" if it has one (robust to reordering), else its line
    return ("id", json.dumps(obj["id"])) if isinstance(obj, dict) and "id" in obj else ("line", line)


def answered_before(path, entries):
    """The entries an earlier run already answered in `path`, which is rewritten without its failed answers (they are
    tried again) -> (entries still to answer, how many were answered)."""
    if not path.exists():
        return entries, 0
    kept, done = [], {}
    for text in path.read_text().splitlines():
        try:
            a = json.loads(text)
        except json.JSONDecodeError:  # a line cut short by a killed run: answered again
            continue
        if isinstance(a, dict) and "output" in a:
            kept.append(text)
            done[request_key(a.get("line"), a)] = a
    todo = []
    for entry in entries:
        n, where, obj = entry[:3]
        a = done.get(request_key(n, obj))
        if a is None:
            todo.append(entry)
        elif a.get("prompt") != obj.get("prompt"):
            raise ValueError(f"{path} answers {where} with another prompt: the requests changed since it was "
                             "written; give a new --output")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return todo, len(entries) - len(todo)


def answer_prompt(model, tok, tenants, args):
    request = Request(encode(tok, args.prompt, args.chat, args.system), next(iter(tenants), None),
                      args.max_new_tokens, args.seed)
    generated, shown = [], ""

    def stream(_, token):  # decode the whole answer each time: SentencePiece spaces depend on the neighbours
        nonlocal shown
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a character spelled as several byte tokens
            print(text[len(shown):], end="", flush=True)
            shown = text

    [res] = decode(model, tok, [request], {k: getattr(args, k) for k in SETTINGS}, 1, tenants, stream, args.fast)
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
        check_files(args)
        model, tok, tenants = load(args)
        if args.prompt is not None:
            return answer_prompt(model, tok, tenants, args)
        defaults = {k: getattr(args, k) for k in OVERRIDES}
        entries, before = read_requests(args.requests, defaults), 0
        if args.output:
            entries, before = answered_before(Path(args.output), entries)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # while loading, or while a --prompt is answered: nothing to keep
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if before:
        print(f"{args.output}: {before} requests answered by an earlier run, skipped", file=sys.stderr)
    # requests done / total, new tokens/s and ETA on stderr: an updating line on a terminal, else every 10 s
    progress, done, failed, new_tokens, t0 = Progress(sys.stderr, log_seconds=10), 0, 0, 0, time.time()
    progress.start("requests")
    sink = open(args.output, "a", encoding="utf-8") if args.output else sys.stdout
    where = args.output or "stdout"

    def write(answers):  # as soon as a batch is done, so an interruption loses only the batch in flight
        nonlocal done, failed, new_tokens
        for a in answers:
            if "error" in a:
                progress.print(f"error: {a['error']}")  # through the progress line, so it never lands on it
        if sink is sys.stdout:
            progress.end()  # answers on the terminal: never after the progress line on the same screen
        sink.write("".join(json.dumps({k: v for k, v in a.items() if k != "new_tokens"}, ensure_ascii=False) + "\n"
                           for a in answers))
        sink.flush()
        done, failed = done + len(answers), failed + sum("error" in a for a in answers)
        new_tokens += sum(a.get("new_tokens", 0) for a in answers)
        progress.count("requests", done, len(entries), f"{failed} failed  "
                       f"{new_tokens / max(time.time() - t0, 1e-9):,.0f} new tok/s", keep=done == len(entries))

    try:
        serve(model, tok, tenants, entries, args, write)
    except KeyboardInterrupt:
        progress.print(f"interrupted: {done} of {len(entries)} answers written to {where}"
                              + (" (run the same command again to answer the rest)" if args.output else ""))
        sys.exit(130)
    finally:
        progress.end()
        if args.output:
            sink.close()
    if failed:
        print(f"error: {failed} of {len(entries)} requests failed (their \"error\" says why); the others "
              f"are answered in {where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
