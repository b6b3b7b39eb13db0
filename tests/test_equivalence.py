# Bit-for-bit agreement with Hugging Face transformers' LlamaForCausalLM on a CPU, in bf16 and fp16 (and fp32):
# torch.equal logits for whole prompts, cached decoding, left-padded batches, and the same greedy tokens as
# generate(). The reference runs with its default attention, "sdpa" (torch's scaled_dot_product_attention, which
# on a CPU runs its flash-attention kernel for all of these inputs), loaded as a user loads it:
# from_pretrained(dtype=...), which keeps RoPE's inverse frequencies in fp32.
#
# What makes the low-precision results equal (model.py): RoPE rounds cos and sin to the activations' dtype and
# rounds each product and the sum there; at a decoded token of a padded batch with grouped-query attention, each
# KV head's query heads are the rows of one attention. The keys attention reads stop at the last written position:
# the CPU kernel's sums depend on how many keys it is given, masked or not.
import pytest
import torch

from conftest import random_hf_llama, shared
from para_mini import load_model
from para_mini.generation import Request, generate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# two layers at width 512: multi-head, and grouped-query with four query heads per KV head
RANDOM = {"mha-512": dict(n_heads=8, n_kv_heads=8), "gqa-512": dict(n_heads=8, n_kv_heads=2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Hugging Face checkpoint directories: the shared stories260K and the random configurations, saved once."""
    dirs = {}

    def get(name):
        if name not in dirs:
            if name == "stories260K":
                dirs[name] = shared("assets", "stories260K", "hf")
            else:
                dirs[name] = tmp_path_factory.mktemp(name)
                hf = random_hf_llama(dim=512, n_layers=2, ffn=1024, vocab=256, std=0.05, **RANDOM[name])
                hf.save_pretrained(dirs[name])
        return dirs[name]
    return get


@pytest.fixture(params=["stories260K", *RANDOM])
def both(request, checkpoints):
    """(Hugging Face model, ours, vocabulary size) per dtype, both loaded from the same checkpoint directory."""
    import transformers
    path = checkpoints(request.param)

    def load(dtype):
        hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
        assert hf.config._attn_implementation == "sdpa"  # transformers' default: the reference these tests name
        return hf, load_model(path, dtype=dtype), hf.config.vocab_size
    return load


def hf_positions(attention_mask):
    """The positions generate() gives a left-padded batch: counted from each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    tokens = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    return tokens, pad, (torch.arange(T)[None] >= pad[:, None]).long()


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_whole_prompts_give_hugging_face_s_logits_bit_for_bit(both, dtype):
    hf, ours, vocab = both(DTYPES[dtype])
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens).logits
    assert ref.dtype == DTYPES[dtype] and ref.float().std() > 1.0  # logits large enough to disagree visibly
    assert torch.equal(ours(tokens), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_cached_decoding_gives_hugging_face_s_cached_logits_bit_for_bit_at_every_step(both, dtype):
    import transformers
    hf, ours, vocab = both(DTYPES[dtype])
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    cache, hf_cache = ours.new_cache(2, 24), transformers.DynamicCache(config=hf.config)
    assert torch.equal(ours(tokens[:, :8], cache=cache), hf(tokens[:, :8], cache=hf_cache, use_cache=True).logits)
    for t in range(8, 24):  # then one token at a time
        ref = hf(tokens[:, t:t + 1], cache=hf_cache, use_cache=True).logits
        assert torch.equal(ours(tokens[:, t:t + 1], cache=cache), ref), f"step {t}"


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_a_left_padded_batch_gives_hugging_face_s_logits_bit_for_bit_in_prefill_and_decoding(both, dtype):
    # Hugging Face is given the attention mask and generate()'s positions. Only real tokens are compared: a padding
    # position sees nothing there and itself here, and neither model lets a real token see it.
    import transformers
    hf, ours, vocab = both(DTYPES[dtype])
    g = torch.Generator().manual_seed(2)
    tokens, pad, attention_mask = left_padded([torch.randint(3, vocab, (n,), generator=g) for n in (9, 24, 17)])
    then = torch.randint(3, vocab, (3, 8), generator=g)  # eight more tokens per row, decoded with the caches
    real = attention_mask.bool()

    ref = hf(tokens, attention_mask=attention_mask, position_ids=hf_positions(attention_mask)).logits
    assert torch.equal(ours(tokens, pad=pad)[real], ref[real])

    cache, hf_cache = ours.new_cache(3, 24 + 8), transformers.DynamicCache(config=hf.config)
    ref = hf(tokens, attention_mask=attention_mask, position_ids=hf_positions(attention_mask), cache=hf_cache,
             use_cache=True).logits
    assert torch.equal(ours(tokens, pad=pad, cache=cache)[real], ref[real])
    for t in range(8):
        attention_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ref = hf(then[:, t:t + 1], attention_mask=attention_mask, position_ids=hf_positions(attention_mask)[:, -1:],
                 cache=hf_cache, use_cache=True).logits
        assert torch.equal(ours(then[:, t:t + 1], cache=cache), ref), f"step {t}"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@torch.no_grad()
def test_greedy_generation_gives_hugging_face_generate_s_tokens_for_64_new_tokens(both, dtype):
    hf, ours, vocab = both(DTYPES[dtype])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (5, 11, 8)]
    tokens, pad, attention_mask = left_padded(prompts)
    want = hf.generate(tokens, attention_mask=attention_mask, do_sample=False, max_new_tokens=64, eos_token_id=None,
                       pad_token_id=0)[:, tokens.shape[1]:]
    got = [r.tokens for r in generate(ours, [Request(p.tolist(), None, 64) for p in prompts])]
    assert want.shape == (3, 64)  # no early stop: all 64 tokens of every row are compared
    assert got == want.tolist()
    assert all(len(set(row)) >= 8 for row in got)  # varied text, not one token repeated
