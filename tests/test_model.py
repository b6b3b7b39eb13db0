# The base model against Hugging Face transformers (the numerical reference), and its own consistency:
# cached decoding and left-padded batches give the same logits as a plain forward pass.
import pytest
import torch

from conftest import random_hf_llama, shared
from para_mini import ModelArgs, Transformer, load_model

TOL = 1e-4


def greedy(model, prompt, n_new):
    """Greedy decoding with the KV cache: one prefill, then one token at a time."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n_new)
    logits = model(prompt, cache=cache)
    out = [logits[:, -1].argmax(-1)]
    for _ in range(n_new - 1):
        out.append(model(out[-1][:, None], cache=cache)[:, -1].argmax(-1))
    return torch.cat([prompt, torch.stack(out, 1)], 1)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["multi-head", "grouped-query"])
@torch.no_grad()
def test_fp32_logits_equal_hugging_face_at_every_position(tmp_path, heads):
    n_heads, n_kv_heads = heads
    hf = random_hf_llama(n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=500.0)  # a non-default theta too
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert (model.args.n_heads, model.args.n_kv_heads, model.args.rope_theta) == (n_heads, n_kv_heads, 500.0)

    tokens = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens).logits
    assert ref.std() > 1.0  # logits large enough that a 1e-4 agreement means something
    assert (model(tokens) - ref).abs().max() <= TOL

    # logits at some positions only: the last (generation's prefill), and a ragged mask (training's responses)
    assert (model(tokens, logits_at=slice(-1, None)) - ref[:, -1:]).abs().max() <= TOL
    picked = torch.zeros(3, 24, dtype=torch.bool)
    picked[0, 5], picked[1, 10:14], picked[2, -1] = True, True, True
    assert model(tokens, logits_at=picked).shape == (6, 128)
    assert (model(tokens, logits_at=picked) - ref[picked]).abs().max() <= TOL


@torch.no_grad()
def test_tied_embeddings_load_as_one_tensor_and_equal_hugging_face(tmp_path):
    hf = random_hf_llama(n_heads=4, n_kv_heads=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    assert (model(tokens) - hf(tokens).logits).abs().max() <= TOL


# ------------------------------------------------------------------------------- the shared stories260K model

@pytest.fixture(scope="module")
def hf_260k():
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(shared("assets", "stories260K", "hf")).eval()


@pytest.mark.parametrize("fmt", ["stories260K.bin", "meta", "hf"])
@torch.no_grad()
def test_stories260k_in_every_format_equals_hugging_face_logits_and_greedy_tokens(hf_260k, fmt):
    model = load_model(shared("assets", "stories260K", fmt))
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = hf_260k(tokens).logits
    assert ref.std() > 1.0
    assert (model(tokens) - ref).abs().max() <= TOL

    bos = torch.tensor([[1]])
    hf_tokens = hf_260k.generate(bos, attention_mask=torch.ones_like(bos), do_sample=False, max_new_tokens=60,
                                 eos_token_id=None, pad_token_id=0)
    assert hf_tokens.shape == (1, 61)  # no early stop: all 60 tokens are compared
    assert greedy(model, bos, 60).tolist() == hf_tokens.tolist()


# ------------------------------------------------------------------------------------- cache and left padding

def random_model(n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=100,
                                  hidden_dim=96, max_seq_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.5 * torch.rand_like(p) if p.ndim == 1 else torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
@torch.no_grad()
def test_cached_decoding_equals_a_full_forward(n_kv_heads):
    model = random_model(n_kv_heads)
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)

    cache = model.new_cache(2, 20)
    steps = [model(tokens[:, :8], cache=cache)]  # prefill 8 tokens, then decode the other 12 one by one
    steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(8, 20)]
    assert full.std() > 1.0
    assert (torch.cat(steps, 1) - full).abs().max() <= TOL


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
@torch.no_grad()
def test_left_padded_prompts_get_the_logits_they_get_alone_in_prefill_and_decoding(n_kv_heads):
    model = random_model(n_kv_heads)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in (5, 12, 9)]
    then = torch.randint(3, 100, (3, 4), generator=g)  # four more tokens per row, decoded with the cache
    T = max(len(p) for p in prompts)
    pad = torch.tensor([T - len(p) for p in prompts])
    batch = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])

    uncached = model(batch, pad=pad)
    cache = model.new_cache(3, T + 4)
    prefill = model(batch, pad=pad, cache=cache)
    decoded = torch.cat([model(then[:, t:t + 1], cache=cache) for t in range(4)], 1)

    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, then[i]])[None])[0]
        assert (uncached[i, pad[i]:] - alone[:len(p)]).abs().max() <= TOL
        assert (prefill[i, pad[i]:] - alone[:len(p)]).abs().max() <= TOL
        assert (decoded[i] - alone[len(p):]).abs().max() <= TOL


@torch.no_grad()
def test_decoding_gives_attention_a_mask_only_when_a_row_is_left_padded(monkeypatch):
    # without padding every cached position is visible to the new token: no mask, fewer kernels per step (the
    # logits are the same either way: the tests above)
    from para_mini import model as model_py
    from para_mini.generation import Request, generate
    seen, sdpa = [], model_py.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model_py.F, "scaled_dot_product_attention", spy)
    model = random_model(4)
    g = torch.Generator().manual_seed(0)
    for lens, masked in (([7, 7], False), ([7, 4], True)):
        seen.clear()
        generate(model, [Request(torch.randint(3, 100, (n,), generator=g).tolist(), None, 3) for n in lens])
        decoding = [no_mask for T, no_mask in seen if T == 1]
        assert len(decoding) == 2 * model.args.n_layers  # two decoding steps after the prefill
        assert all(no_mask != masked for no_mask in decoding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@torch.no_grad()
def test_rmsnorm_equals_hugging_face_s_bit_for_bit_in_every_dtype(dtype):
    # Hugging Face normalises in fp32 whatever the dtype, then rounds before the weight: F.rms_norm must do the same
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from para_mini.model import RMSNorm
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 96, generator=g) * 4).to(dtype)
    weight = (1 + torch.randn(96, generator=g)).to(dtype)
    ours, theirs = RMSNorm(96, 1e-5).to(dtype), modeling.LlamaRMSNorm(96, eps=1e-5).to(dtype)
    ours.weight.copy_(weight)
    theirs.weight.copy_(weight)
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
