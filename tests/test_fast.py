# The captured step (fast.py: the KV cache in its static mode, replayed from a CUDA graph on a GPU) against plain
# eager decoding, which gives the same logits step by step, the same tokens from greedy decoding, sampling and beam
# search, for left-padded batches whose rows mix PARA, LoRA, (IA)^3, BitFit and no adapter. The eager path is checked
# against Hugging Face elsewhere (test_model.py, test_generation.py, test_para.py).
# On a machine with a GPU every test runs there too, where the step is replayed from a CUDA graph.
import gc
import math
import weakref

import pytest
import torch

from para_mini import AdapterConfig
from para_mini.fast import Step
from para_mini.generation import Request, beam_search, generate, prefill
from test_generation import EOS, random_prompts, randomize, tenants, tiny_model


DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # fp32; attention over the whole buffer sums in another order than over its start


def mixed(model, device):
    """tenants() (two PARA, a LoRA, an (IA)^3, a row without adapter) and a BitFit -> (Tenants, a name per row)."""
    model.to(device)
    served, names = tenants(model)
    served.add("bitfit", AdapterConfig("bitfit"))
    randomize(served, "bitfit", seed=20)
    return served, names + ["bitfit"]


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_the_static_step_gives_the_eager_logits_and_reorders_rows_as_the_eager_cache_does(device):
    model = tiny_model(vocab=64)
    served, names = mixed(model, device)
    batch = [Request(p, a, 8) for p, a in zip(random_prompts(64, [9, 4, 13, 9, 6, 11], seed=4), names)]
    with served.rows(names):
        cache = model.new_cache(len(batch), 13 + 8)
        logits = prefill(model, batch, cache)  # left-padded: the prompts differ in length
        step = Step(model, len(batch), 32, compile=False)  # its own cache, longer: the mask hides the rest
        torch.testing.assert_close(prefill(model, batch, step.reuse()), logits, rtol=0, atol=0)
        step.load()
        assert step.cache.static and not cache.static
        for n in range(6):
            tokens = logits.argmax(-1)
            if n == 3:  # as beam search moves hypotheses: rows copied onto others, the rest permuted
                src = torch.tensor([1, 1, 0, 3, 5, 4], device=device)
                cache.reorder(src)
                step.cache.reorder(src)
            logits = model(tokens[:, None], cache=cache)[:, -1].float()
            torch.testing.assert_close(step(tokens), logits, rtol=TOL[device], atol=TOL[device])
    assert logits.std(0).min() > 0.1  # the rows really differ
    assert step.cache.n == cache.n == 13 + 6  # both counted every token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_greedy_decoding_and_sampling_give_the_eager_tokens(temperature, device):
    model = tiny_model(vocab=16, seed=1)  # a small vocabulary: rows end at eos at different steps
    served, names = mixed(model, device)
    requests = [Request(p, a, 10) for p, a in zip(random_prompts(16, [9, 4, 13, 9, 6, 11], seed=4), names)]
    eager = generate(model, requests, eos_id=EOS, temperature=temperature, tenants=served)
    fast = generate(model, requests, eos_id=EOS, temperature=temperature, tenants=served, fast=True)
    assert [(r.tokens, r.stop) for r in fast] == [(r.tokens, r.stop) for r in eager]
    assert {r.stop for r in eager} == {"eos", "length"}  # finished rows stay in the batch, ignored


@pytest.mark.parametrize("device", DEVICES)
def test_fast_beam_search_gives_the_eager_hypotheses_and_scores(device):
    model = tiny_model(vocab=16, seed=1)
    served, names = mixed(model, device)
    requests = [Request(p, a, 8) for p, a in zip(random_prompts(16, [9, 4, 13, 9, 6, 11], seed=4), names)]
    eager = beam_search(model, requests, beam=3, num_return=3, eos_id=EOS, tenants=served)
    fast = beam_search(model, requests, beam=3, num_return=3, eos_id=EOS, tenants=served, fast=True)
    assert any(r.stop == "eos" for r in eager) and any(len(r.tokens) < 8 for r in eager)  # requests end early
    for e, f in zip(eager, fast):
        assert [t for t, _ in f.beams] == [t for t, _ in e.beams] and f.stop == e.stop
        for (_, s), (_, s2) in zip(f.beams, e.beams):
            assert math.isclose(s, s2, rel_tol=TOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_kept_for_a_batch_of_the_same_shape_serves_that_batch_s_adapters(device):
    model = tiny_model(vocab=64)
    served, names = mixed(model, device)
    prompts = random_prompts(64, [9, 4, 13, 9, 6, 11], seed=6)
    first = generate(model, [Request(p, a, 6) for p, a in zip(prompts, names)], tenants=served, fast=True)
    step, graph = model.decode_step, model.decode_step.graph
    vectors = [t for l in step.cache.l for t in l.values()]
    shuffled = [Request(p, a, 6) for p, a in zip(prompts, names[3:] + names[:3])]  # other tenants on each row
    fast = generate(model, shuffled, tenants=served, fast=True)
    # the same buffers and the same graph: the new rows' tensors were written where the graph reads them
    assert model.decode_step is step and step.graph is graph and (graph is None) == (device == "cpu")
    assert all(a is b for a, b in zip(vectors, [t for l in step.cache.l for t in l.values()]))
    assert [r.tokens for r in fast] == [r.tokens for r in generate(model, shuffled, tenants=served)]
    assert [r.tokens for r in fast] != [r.tokens for r in first]


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_step_forgets_the_last_batch_s_padding_when_the_next_has_none(device):
    model = tiny_model(vocab=64)
    served, names = mixed(model, device)
    padded = random_prompts(64, [9, 4, 13, 9, 6, 11], seed=6)
    generate(model, [Request(p, a, 6) for p, a in zip(padded, names)], tenants=served, fast=True)
    step = model.decode_step
    assert step.cache.pad.sum() > 0
    even = [Request(p, a, 6) for p, a in zip(random_prompts(64, [13] * 6, seed=7), names)]  # the same shape
    fast = generate(model, even, tenants=served, fast=True)
    assert model.decode_step is step and step.cache.pad.sum() == 0
    assert [r.tokens for r in fast] == [r.tokens for r in generate(model, even, tenants=served)]


def test_dropping_the_kept_step_frees_it_at_once():
    # a step held in a reference cycle would keep its cache (and, on a GPU, its graph's memory pool) until the next
    # garbage collection: benchmarks free it between rows and measure memory right after
    model = tiny_model(vocab=64)
    generate(model, [Request(p, None, 3) for p in random_prompts(64, [5, 7])], fast=True)
    kept = weakref.ref(model.decode_step)
    gc.disable()
    try:
        model.decode_step = None
        assert kept() is None
    finally:
        gc.enable()
