# The fast decode path (fast.py) against the eager one: the same logits step by step, the same tokens from greedy
# decoding, sampling and beam search, for left-padded batches whose rows mix PARA, LoRA, (IA)^3, BitFit and no adapter.
# The eager path is checked against Hugging Face elsewhere (test_model.py, test_generation.py, test_para.py).
# On a machine with a GPU every test runs there too, where the fast step is replayed from a CUDA graph.
import math

import pytest
import torch

from para_mini import AdapterConfig, add_adapter
from para_mini.fast import fast_decoder
from para_mini.generation import Request, beam_search, generate, prefill
from test_generation import EOS, random_prompts, randomize, tenants, tiny_model


DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # fp32; a GPU's attention kernels for the two buffer lengths may differ more


def mixed(model, device):
    """tenants() (two PARA, a LoRA, an (IA)^3, a row without adapter) and a BitFit: a name per row."""
    add_adapter(model, AdapterConfig("bitfit"), "bitfit")
    randomize(model, "bitfit", seed=20)
    names = tenants(model) + ["bitfit"]
    model.to(device).requires_grad_(False)
    return names


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_the_static_step_gives_the_eager_logits_and_reorders_rows_as_the_eager_cache_does(device):
    model = tiny_model(vocab=64)
    names = mixed(model, device)
    batch = [Request(p, a, 8) for p, a in zip(random_prompts(64, [9, 4, 13, 9, 6, 11], seed=4), names)]
    cache, logits = prefill(model, batch)  # left-padded: the prompts differ in length
    decoder = fast_decoder(model, cache)  # a copy of the prefill: the eager path goes on with `cache`
    rows = torch.arange(len(batch), device=device)
    for step in range(6):
        tokens = logits.argmax(-1)
        if step == 3:  # as beam search moves hypotheses: rows copied onto others, the rest permuted
            src = torch.tensor([1, 1, 0, 3, 5, 4], device=device)
            cache.reorder(src)
            decoder.reorder(rows, src)
        logits = model(tokens[:, None], cache=cache)[:, -1].float()
        torch.testing.assert_close(decoder.step(rows, tokens), logits, rtol=TOL[device], atol=TOL[device])
    assert logits.std(0).min() > 0.1  # the rows really differ


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_greedy_decoding_and_sampling_give_the_eager_tokens(temperature, device):
    model = tiny_model(vocab=16, seed=1)  # a small vocabulary: rows end at eos at different steps
    names = mixed(model, device)
    requests = [Request(p, a, 10) for p, a in zip(random_prompts(16, [9, 4, 13, 9, 6, 11], seed=4), names)]
    eager = generate(model, requests, eos_id=EOS, temperature=temperature)
    fast = generate(model, requests, eos_id=EOS, temperature=temperature, fast=True)
    assert [(r.tokens, r.stop) for r in fast] == [(r.tokens, r.stop) for r in eager]
    assert {r.stop for r in eager} == {"eos", "length"}  # finished rows stay in the static batch, ignored


@pytest.mark.parametrize("device", DEVICES)
def test_fast_beam_search_gives_the_eager_hypotheses_and_scores(device):
    model = tiny_model(vocab=16, seed=1)
    names = mixed(model, device)
    requests = [Request(p, a, 8) for p, a in zip(random_prompts(16, [9, 4, 13, 9, 6, 11], seed=4), names)]
    eager = beam_search(model, requests, beam=3, num_return=3, eos_id=EOS)
    fast = beam_search(model, requests, beam=3, num_return=3, eos_id=EOS, fast=True)
    assert any(r.stop == "eos" for r in eager) and any(len(r.tokens) < 8 for r in eager)  # requests end early
    for e, f in zip(eager, fast):
        assert [t for t, _ in f.beams] == [t for t, _ in e.beams] and f.stop == e.stop
        for (_, s), (_, s2) in zip(f.beams, e.beams):
            assert math.isclose(s, s2, rel_tol=TOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_the_decoder_kept_for_a_batch_of_the_same_shape_serves_that_batch_s_adapters(device):
    model = tiny_model(vocab=64)
    names = mixed(model, device)
    prompts = random_prompts(64, [9, 4, 13, 9, 6, 11], seed=6)
    first = generate(model, [Request(p, a, 6) for p, a in zip(prompts, names)], fast=True)
    decoder, layouts, graph = model.fast_decoder, model.fast_decoder.layouts, model.fast_decoder.graph
    shuffled = [Request(p, a, 6) for p, a in zip(prompts, names[3:] + names[:3])]  # other tenants on each row
    fast = generate(model, shuffled, fast=True)
    assert model.fast_decoder is decoder and decoder.layouts is layouts  # the same buffers, no new graph
    assert decoder.graph is graph and (graph is None) == (device == "cpu")
    assert [r.tokens for r in fast] == [r.tokens for r in generate(model, shuffled)]
    assert [r.tokens for r in fast] != [r.tokens for r in first]


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_decoder_forgets_the_last_batch_s_padding_when_the_next_has_none(device):
    # prompts of one length leave the cache without padding (pad None: the eager steps need no mask); the decoder
    # kept from a left-padded batch of the same shape must clear the padding it holds, or rows would lose keys
    model = tiny_model(vocab=64)
    names = mixed(model, device)
    padded = random_prompts(64, [9, 4, 13, 9, 6, 11], seed=6)
    generate(model, [Request(p, a, 6) for p, a in zip(padded, names)], fast=True)
    decoder = model.fast_decoder
    assert decoder.pad.sum() > 0
    even = [Request(p, a, 6) for p, a in zip(random_prompts(64, [13] * 6, seed=7), names)]  # the same shape
    fast = generate(model, even, fast=True)
    assert model.fast_decoder is decoder and decoder.pad.sum() == 0
    assert [r.tokens for r in fast] == [r.tokens for r in generate(model, even)]
