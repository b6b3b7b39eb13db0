# Decoding with the explicit KV cache: greedy, sampling and beam search against references that do not use the
# cache (an exhaustive search scored by full forward passes, Hugging Face's generate), mixed-tenant batches against
# each request alone, and per-request errors; then the generate.py command line.
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared
from hf_reference import ours_from_hf, tiny_hf
from para_mini import AdapterConfig, ModelArgs, Tenants, Transformer, add_adapter, load_model, save_adapter
from para_mini.adapters import adapter_state
from para_mini.generation import Request, beam_search, generate

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


def tiny_model(seed=0, vocab=32, std=0.2, **kw):
    """Random weights large enough that every block, and so every adapter, moves the logits."""
    torch.manual_seed(seed)
    args = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=80, max_seq_len=64) | kw
    model = Transformer(ModelArgs(**args)).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(1 + 0.5 * torch.rand_like(p) if "norm" in name else torch.randn_like(p) * std)
    return model


def randomize(owner, name, seed, std=0.3):
    """Give an adapter non-trivial weights (at initialisation PARA, (IA)^3 and LoRA are all identities): the tenant
    `name` of a Tenants, or a model's own (name None)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (adapter_state(owner) if name is None else owner.state(name)).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def random_prompts(vocab, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def tenants(model):
    """Two PARA tenants with different weights, a LoRA and an (IA)^3, all non-trivial -> (the Tenants, a name per
    row)."""
    t = Tenants(model)
    for i, (name, cfg) in enumerate([("para_a", AdapterConfig("para")), ("para_b", AdapterConfig("para")),
                                     ("lora", AdapterConfig("lora")), ("ia3", AdapterConfig("ia3"))]):
        t.add(name, cfg)
        randomize(t, name, seed=10 + i)
    return t, ["para_a", "lora", None, "para_b", "ia3"]


# ------------------------------------------------------------------------------------------------ beam search

def test_beam_search_with_beam_1_is_greedy_decoding():
    model = tiny_model(vocab=8)  # a tiny vocabulary: eos is often the most likely token
    requests = [Request(p, None, 12) for p in random_prompts(8, [3, 7, 5, 10, 4, 6])]
    greedy = generate(model, requests, eos_id=EOS)
    beams = beam_search(model, requests, beam=1, eos_id=EOS)
    assert {g.stop for g in greedy} == {"eos", "length"}  # both ways of stopping are exercised
    for g, b in zip(greedy, beams):
        assert (b.tokens, b.stop) == (g.tokens, g.stop)


def exhaustive(model, prompt, n_new, length_penalty):
    """Every continuation of up to n_new tokens (ending at eos or at n_new), scored by full forward passes
    without the cache: sum of log-probs / length ** length_penalty, eos counted -> [(score, tokens)], best first."""
    V = model.args.vocab_size
    seqs = [s[:k] for k in range(1, n_new + 1) for s in itertools.product(range(V), repeat=k)
            if EOS not in s[:k - 1] and (s[k - 1] == EOS or k == n_new)]
    seqs = sorted(set(seqs))
    scored = []
    for s in seqs:
        tokens = torch.tensor([prompt + list(s)])
        logp = model(tokens)[0, len(prompt) - 1:-1].float().log_softmax(-1)
        total = sum(logp[i, t].item() for i, t in enumerate(s))
        scored.append((total / len(s) ** length_penalty, list(s[:-1]) if s[-1] == EOS else list(s)))
    return sorted(scored, key=lambda x: -x[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_wide_enough_to_keep_every_hypothesis_equals_exhaustive_search(length_penalty):
    # A beam as wide as the vocabulary keeps every hypothesis for two tokens only; for n_new tokens it takes
    # vocab ** n_new beams, which on a 6-token vocabulary and 3 new tokens is 216 rows of a tiny model.
    V, n_new = 6, 3
    model = tiny_model(vocab=V, seed=3)
    prompt = random_prompts(V, [5], seed=1)[0]
    want = exhaustive(model, prompt, n_new, length_penalty)
    [got] = beam_search(model, [Request(prompt, None, n_new)], beam=V ** n_new, length_penalty=length_penalty,
                        num_return=5, eos_id=EOS)
    assert [t for t, _ in got.beams] == [t for _, t in want[:5]]
    for (_, score), (ref, _) in zip(got.beams, want):
        assert math.isclose(score, ref, rel_tol=1e-5)
    assert any(len(t) < n_new for _, t in want[:5])  # hypotheses ending in eos compete with full-length ones


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_beam_search_as_wide_as_the_vocabulary_finds_the_exhaustive_best_of_two_tokens(length_penalty, seed):
    V, n_new = 6, 2
    model = tiny_model(vocab=V, seed=seed)
    prompt = random_prompts(V, [5], seed=seed)[0]
    (best_score, best), *_ = exhaustive(model, prompt, n_new, length_penalty)
    [got] = beam_search(model, [Request(prompt, None, n_new)], beam=V, length_penalty=length_penalty, eos_id=EOS)
    assert got.beams[0][0] == best and got.tokens == best
    assert math.isclose(got.beams[0][1], best_score, rel_tol=1e-5)


def test_beam_search_equals_hugging_face_generate_with_num_beams():
    pytest.importorskip("transformers")
    hf = tiny_hf(seed=1, vocab=8, std=0.3)
    model = ours_from_hf(hf)
    prompts = random_prompts(8, [3, 5, 9], seed=2)
    n_ended = 0
    for length_penalty, beam in [(1.0, 3), (0.0, 2), (2.0, 4), (-0.5, 3)]:
        ours = beam_search(model, [Request(p, None, 10) for p in prompts], beam=beam,
                           length_penalty=length_penalty, num_return=beam, eos_id=EOS)  # one batch, left-padded
        for p, res in zip(prompts, ours):
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=10, num_beams=beam, num_return_sequences=beam, do_sample=False,
                              length_penalty=length_penalty, early_stopping=False, eos_token_id=EOS,
                              pad_token_id=EOS, output_scores=True, return_dict_in_generate=True)
            for (tokens, score), seq, ref in zip(res.beams, out.sequences[:, len(p):].tolist(),
                                                 out.sequences_scores.tolist()):
                n_ended += EOS in seq
                assert tokens == (seq[:seq.index(EOS)] if EOS in seq else seq)
                assert math.isclose(score, ref, rel_tol=1e-5)
    assert n_ended > 0


# ------------------------------------------------------------------------------------ many tenants in a batch

@pytest.mark.parametrize("beam", [1, 3])
def test_a_mixed_batch_gives_every_request_what_it_gets_alone(beam):
    model = tiny_model(vocab=64, max_seq_len=48)
    served, names = tenants(model)
    prompts = random_prompts(64, [9, 4, 13, 9, 6], seed=4)  # different lengths: rows are left-padded
    requests = [Request(p, a, 8) for p, a in zip(prompts, names)]
    run = (lambda rs: generate(model, rs, eos_id=EOS, tenants=served)) if beam == 1 else \
        (lambda rs: beam_search(model, rs, beam=beam, num_return=2, eos_id=EOS, tenants=served))
    mixed = run(requests)
    for r, m in zip(requests, mixed):
        [alone] = run([r])
        assert m.tokens == alone.tokens and m.stop == alone.stop
        for (t, s), (t2, s2) in zip(m.beams, alone.beams):
            assert t == t2 and math.isclose(s, s2, rel_tol=1e-5)
    same_prompt = [Request(prompts[0], a, 8) for a in names]
    assert len({tuple(r.tokens) for r in run(same_prompt)}) == len(names)  # each adapter really changes the output


def test_the_vector_generator_runs_at_prefill_only():
    model = tiny_model(vocab=64)
    t, names = tenants(model)
    calls = []
    # a mixed batch runs one of the PARA tenants' generators per layer, with every row's own weights
    hooks = [m["vg"].register_forward_hook(lambda *_: calls.append(1))
             for name in ("para_a", "para_b") for m in t.adapters[name][1]]
    requests = [Request(p, a, 10) for p, a in zip(random_prompts(64, [5, 8, 3, 6, 7]), names)]
    generate(model, requests, tenants=t)  # no eos: ten decoding steps
    assert len(calls) == len(model.layers)
    beam_search(model, requests, beam=3, tenants=t)
    assert len(calls) == 2 * len(model.layers)
    generate(model, requests[:1], tenants=t)  # one PARA tenant alone: its own generators, as fine-tuned
    assert len(calls) == 3 * len(model.layers)
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------------------------------------------- sampling

def test_sampling_with_a_seed_is_reproducible_and_another_seed_samples_differently():
    model = tiny_model(vocab=64)
    prompts = random_prompts(64, [6, 3, 9])
    sample = lambda seed, rs: [r.tokens for r in generate(model, rs, temperature=1.0, seed=seed)]
    requests = [Request(p, None, 12) for p in prompts]
    first = sample(7, requests)
    assert sample(7, requests) == first
    assert sample(8, requests) != first
    # a request's own seed makes its sample independent of the rest of its batch
    alone = sample(0, [Request(prompts[1], None, 12, seed=7)])
    assert alone == [first[1]]


def test_sampling_from_the_single_most_likely_token_is_greedy_decoding():
    model = tiny_model(vocab=64)
    requests = [Request(p, None, 10) for p in random_prompts(64, [6, 3, 9])]
    greedy = [r.tokens for r in generate(model, requests)]
    assert [r.tokens for r in generate(model, requests, temperature=1.5, top_k=1)] == greedy
    assert [r.tokens for r in generate(model, requests, temperature=1.5, top_p=1e-6)] == greedy


def test_the_stream_callback_sees_every_token_of_every_request_in_order():
    model = tiny_model(vocab=16)
    requests = [Request(p, None, 9) for p in random_prompts(16, [6, 3, 9, 2])]
    seen = {}
    results = generate(model, requests, eos_id=EOS, stream=lambda i, t: seen.setdefault(i, []).append(t))
    assert [seen.get(i, []) for i in range(4)] == [r.tokens for r in results]


# ---------------------------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize("beam", [1, 2])
def test_bad_requests_get_their_own_error_and_the_others_complete(beam):
    model = tiny_model(vocab=64)
    t, _ = tenants(model)
    good = [Request([1, 5, 9], "para_a", 6), Request([1, 7], None, 6)]
    bad = [Request([1, 5], "nobody", 6), Request([], None, 6), Request([1] * 60, None, 6)]
    run = (lambda rs: generate(model, rs, tenants=t)) if beam == 1 else \
        (lambda rs: beam_search(model, rs, beam=beam, tenants=t))
    results = run([good[0], bad[0], bad[1], good[1], bad[2]])
    assert "unknown adapter 'nobody'" in results[1].error
    assert "empty prompt" in results[2].error
    assert "exceeds the model's context of 64 tokens" in results[4].error
    assert [results[0].tokens, results[3].tokens] == [r.tokens for r in run(good)]
    assert results[0].error is None and len(results[0].tokens) == 6


# ------------------------------------------------------------------------------------------------- generate.py

def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_generate_py_answers_every_good_line_and_names_the_file_and_line_of_each_bad_one(tmp_path):
    weights = shared("assets", "stories260K", "hf")
    model = load_model(weights)
    add_adapter(model, AdapterConfig("para"))
    randomize(model, None, seed=0)
    save_adapter(model, tmp_path / "story.safetensors")
    lines = [{"prompt": "Once upon a time", "adapter": "story", "chat": False},
             {"prompt": "Lily", "adapter": "nobody"},
             "this line is not json",
             {"prompt": ""},
             {"prompt": "word " * 600},
             {"prompt": "Tom had a dog", "beam": 2, "num_return": 2},
             {"prompt": "A cat", "max_tokens": 3}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli("--weights", weights, "--adapter", tmp_path / "story.safetensors", "--requests", requests,
                   "--output", out, "--max-new-tokens", 16)
    assert proc.returncode == 1, proc.stderr  # some lines failed; the others are answered
    assert "5 of 7 requests failed" in proc.stderr and "requests 7/7" in proc.stderr
    got = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda a: a["line"])
    assert [a["line"] for a in got] == list(range(1, len(lines) + 1))
    assert got[0]["output"] and got[5]["output"] and len(got[5]["beams"]) == 2
    errors = {i: g["error"] for i, g in enumerate(got) if "error" in g}
    assert sorted(errors) == [1, 2, 3, 4, 6]
    for i, e in errors.items():
        assert e.startswith(f"{requests}:{i + 1}: ")
        assert e in proc.stderr
    assert "unknown adapter 'nobody'" in errors[1] and "empty prompt" in errors[3]
    assert "exceeds the model's context of 512" in errors[4] and "max_tokens" in errors[6]
    # the adapter's line, answered alone, is the same answer
    requests.write_text(json.dumps(lines[0]) + "\n")
    proc = run_cli("--weights", weights, "--adapter", f"story={tmp_path / 'story.safetensors'}",
                   "--requests", requests, "--max-new-tokens", 16)
    assert proc.returncode == 0 and json.loads(proc.stdout)["output"] == got[0]["output"]


def generate_cli():
    sys.path.insert(0, str(ROOT))
    import generate as cli  # generate.py; the name `generate` here is the library's function
    sys.path.remove(str(ROOT))
    return cli


def test_generate_py_writes_answers_batch_by_batch_keeps_them_on_ctrl_c_and_a_rerun_answers_the_rest(
        tmp_path, capsys, monkeypatch):
    cli = generate_cli()
    weights = shared("assets", "stories260K", "hf")
    lines = [{"prompt": p, "chat": False} for p in ("Once", "Lily", "Tom", "A cat", "The sun")]
    lines.insert(2, {"prompt": ""})  # line 3 fails in every run, before any decoding
    lines.append({"prompt": "Sam", "id": "last"})
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["--weights", weights, "--requests", requests, "--max-new-tokens", 8, "--batch-size", 2]
    straight = tmp_path / "straight.jsonl"
    with pytest.raises(SystemExit) as e:
        cli.main([*map(str, argv), "--output", str(straight)])
    assert e.value.code == 1 and "1 of 7 requests failed" in capsys.readouterr().err

    decode, calls = cli.decode, []

    def ctrl_c_at_the_second_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return decode(*a, **kw)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(cli, "decode", ctrl_c_at_the_second_batch)
    with pytest.raises(SystemExit) as e:
        cli.main([*map(str, argv), "--output", str(out)])
    assert e.value.code == 130
    # the failed line 3 and the first batch (lines 1, 2) were written before the Ctrl-C
    assert sorted(json.loads(x)["line"] for x in out.read_text().splitlines()) == [1, 2, 3]
    assert "interrupted: 3 of 7 answers written" in capsys.readouterr().err

    monkeypatch.setattr(cli, "decode", decode)
    with pytest.raises(SystemExit) as e:
        cli.main([*map(str, argv), "--output", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "2 requests answered by an earlier run, skipped" in err and "requests 5/5" in err  # line 3 tried again
    by_line = lambda path: sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda a: a["line"])
    assert by_line(out) == by_line(straight)  # one answer per line, the same as one uninterrupted run
    assert by_line(out)[-1]["id"] == "last"


def test_generate_py_streams_a_single_prompt_as_the_api_decodes_it():
    from para_mini import load_tokenizer
    weights = shared("assets", "stories260K", "hf")
    proc = run_cli("--weights", weights, "--prompt", "Once upon a time", "--no-chat", "--max-new-tokens", 40)
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(weights)
    [res] = generate(load_model(weights), [Request(tok.encode("Once upon a time", bos=True), None, 40)],
                     eos_id=tok.eos_id)
    assert proc.stdout == tok.decode(res.tokens) + "\n"


GENERATE_OUT_OF_RANGE = [("--batch-size", "0"), ("--max-new-tokens", "0"), ("--temperature", "-0.5"),
                         ("--top-k", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--seed", "-1"), ("--beam", "0"),
                         ("--length-penalty", "inf"), ("--num-return", "0")]


@pytest.mark.parametrize("flag, value", GENERATE_OUT_OF_RANGE)
def test_generate_py_refuses_a_numeric_flag_out_of_its_range_in_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli().main(["--weights", "w", "--prompt", "hi", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: argument {flag}: ") and err.count("\n") == 1
    from para_mini.cli import Range
    actions = generate_cli().parser()._actions
    assert {a.option_strings[0] for a in actions if a.type in (int, float)} == set()  # no unchecked number
    assert {a.option_strings[0] for a in actions if isinstance(a.type, Range)} == {f for f, _ in GENERATE_OUT_OF_RANGE}


def test_generate_py_names_an_adapter_folder_and_refuses_an_adapter_made_on_other_base_weights_unless_allowed(
        tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    cli = generate_cli()
    weights = shared("assets", "stories260K", "hf")
    other = shutil.copytree(weights, tmp_path / "other")  # the same shape, one norm changed
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    model = load_model(other)
    add_adapter(model, AdapterConfig("para"))
    save_adapter(model, tmp_path / "run" / "adapter.safetensors")
    argv = ["--weights", str(weights), "--prompt", "Once", "--no-chat", "--max-new-tokens", "4"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--adapter", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: --adapter {tmp_path / 'run'} is a folder: give an adapter "
                                         f".safetensors file, such as {tmp_path / 'run' / 'adapter.safetensors'}\n")
    argv += ["--adapter", str(tmp_path / "run" / "adapter.safetensors")]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "other base weights of the same shape" in err and "--allow-other-base" in err
    cli.main(argv + ["--allow-other-base"])
    assert capsys.readouterr().out.strip()


def test_the_example_requests_file_is_served_and_errors_never_land_on_the_progress_line(tmp_path, capsys,
                                                                                         monkeypatch):
    cli = generate_cli()
    weights = shared("assets", "stories260K", "hf")
    model = load_model(weights)
    add_adapter(model, AdapterConfig("para"))
    randomize(model, None, seed=0)
    save_adapter(model, tmp_path / "boolq.safetensors")
    argv = ["--weights", str(weights), "--adapter", f"boolq={tmp_path / 'boolq.safetensors'}"]
    cli.main(argv + ["--requests", str(ROOT / "examples" / "requests.jsonl"), "--output", str(tmp_path / "a.jsonl")])
    answers = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(answers) == 5 and all(a.get("output") and "error" not in a for a in answers)
    assert len(next(a for a in answers if a["id"] == "snow")["beams"]) == 2
    capsys.readouterr()

    pyte = pytest.importorskip("pyte")
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    requests = tmp_path / "requests.jsonl"
    lines = [{"prompt": "Once", "chat": False}, {"prompt": ""}, {"prompt": "Tom", "chat": False},
             {"prompt": "Lily", "top_p": 2}]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--requests", str(requests), "--output", str(tmp_path / "b.jsonl"), "--batch-size", "1",
                         "--max-new-tokens", "4"])
    assert e.value.code == 1
    screen = pyte.Screen(250, 20)
    screen.set_mode(pyte.modes.LNM)
    pyte.Stream(screen).feed(capsys.readouterr().err)
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert shown[0] == f"error: {requests}:2: a non-empty \"prompt\" string is required (empty prompt)"
    assert shown[1] == f"error: {requests}:4: \"top_p\" must be above 0.0 and at most 1.0, got 2"
    assert re.fullmatch(r"requests 4/4  2 failed  [\d,]+ new tok/s  elapsed \d+s  eta 0s", shown[2]), shown
    assert shown[3].startswith("error: 2 of 4 requests failed") and len(shown) == 4
