# The training benchmark: its live-tensor counter against hand-worked byte counts, its FLOP count against a
# hand-worked one and against what the step multiplies, PEFT's like-for-like loss against Hugging Face's own, and its
# depth extrapolation against a run at the full depth. Its PARA step is train.py's loss (para_mini.training.loss_sum,
# tested in test_train.py), called, not copied.
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from para_mini.model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark scripts, outside the package, as they import each other
from decode import random_model  # noqa: E402
from train_step import LiveTensors, batch, model_flops, peft_full_head_loss, peft_loss  # noqa: E402


def test_live_tensors_counts_the_bytes_alive_at_the_worst_moment():
    x = torch.zeros(1000, 1000)  # 4,000,000 bytes: 7813 blocks of 512 = 4,000,256
    with LiveTensors(x) as live:
        a = x + 1           # 4,000,256 more
        b = a * 2           # and again: 12,000,768 alive
        view = b[:10].t()   # a view allocates nothing
        del a               # 8,000,512
        c = torch.cat([b, b])  # 8,000,000 (15625 blocks exactly): 16,000,512, the peak
        del b, c, view
        d = x.t().contiguous()  # 8,000,512 at the end
    assert live.peak == 16_000_512
    assert live.live == 8_000_512
    del d
    assert live.live == 4_000_256


def test_live_tensors_sees_what_autograd_keeps_for_the_backward_pass():
    w = torch.zeros(256, 256, requires_grad=True)  # 262,144 bytes
    x = torch.zeros(64, 256)                       # 65,536
    with LiveTensors(w, x) as live:
        h = torch.tanh(x @ w)  # x @ w is freed once tanh is done; tanh saves its output h for the backward
        before = live.live
        loss = h.sum()         # a 0-d tensor: one 512-byte block
        del h
        after = live.live      # h is still alive: autograd holds it
        loss.backward()        # w.grad appears; the graph and h go
    assert before == 262_144 + 65_536 + 65_536
    assert after == before + 512
    assert live.live == 262_144 + 65_536 + 512 + 262_144  # w, x, loss, w.grad


SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96, max_seq_len=64)


def test_model_flops_counts_attention_over_the_whole_sequence_as_palm_does():
    # 3 sequences of 20 tokens, 4 scored each. Per layer, the blocks' weights: wq 64 x 64 = 4096, wk and wv
    # 64 x 32 = 2048 each (2 KV heads of 16), wo 4096, w1 w2 w3 3 x 64 x 96 = 18432: 30720, so 61440 in 2 layers.
    blocks = 2 * 61440 * 60 * 2           # 2 FLOPs per weight per token, forward and the backward to the input
    head = 2 * (64 * 128) * 12 * 2        # the LM head at the 12 scored tokens only
    # attention, per layer and sequence: Q K^T is 20 x 20 dot products of 64 (over all heads), so is the product
    # with V: 2 x 2 x 20 x 20 x 64 = 102400 forward, twice that backward (both operands' gradients)
    attention = 102400 * 3 * 2 * 3
    assert blocks + head + attention == 16_982_016
    assert model_flops(SMALL, 3, 20, 12) == 16_982_016
    assert model_flops(SMALL, 3, 40, 12) - model_flops(SMALL, 3, 20, 12) == 2 * 61440 * 60 * 2 + 3 * attention
    # on the 7B shape attention is 3% of the step at 8 x 512 and 11% at 4 x 2048 (12 x L x d x T per token): a
    # count of 12 x L x d x T per sequence instead would put the MFU that much too low
    for B, T, share in ((8, 512, 0.030), (4, 2048, 0.111)):
        assert 12 * 32 * 4096 * T * T * B / model_flops(ModelArgs(), B, T, 8 * B) == pytest.approx(share, abs=5e-4)


def test_model_flops_is_what_the_step_multiplies_with_a_frozen_backbone():
    # FlopCounterMode counts every matrix product of the forward and backward; with the math attention kernel
    # (the fused CPU kernel is not counted) the scores are whole products too, as in PaLM's convention
    model = random_model(SMALL, torch.float32, torch.device("cpu"))
    model.tok_embeddings.weight.requires_grad_(True)  # gradients flow back through every block, as with an adapter
    tokens, targets, lens = batch(128, 3, 20, 4, "cpu")
    with FlopCounterMode(display=False) as count, sdpa_kernel(SDPBackend.MATH):
        model(tokens, logits_at=targets != -100).sum().backward()
    assert count.get_total_flops() == model_flops(SMALL, 3, 20, 12)


@pytest.fixture(scope="module")
def peft_lora():
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from decode import hf_twin
    from para_mini.loading import HF_NAMES
    hf = hf_twin(random_model(SMALL, torch.float32, torch.device("cpu")))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=[x.split(".")[1] for x in list(HF_NAMES.values())[:7]])
    net = peft.get_peft_model(hf, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter count
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return net


def test_peft_with_the_head_on_the_scored_positions_only_has_the_full_head_loss(peft_lora):
    tokens, targets, lens = batch(128, 3, 20, 4, "cpu")
    targets[1, -3] = -100  # one row scores fewer tokens: the columns some row scores, then the scored ones
    seen = []
    hook = peft_lora.base_model.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1]))
    try:
        ours = peft_loss(peft_lora, tokens, targets)
        ours.backward()
        ours_grads = [p.grad.clone() for p in peft_lora.parameters() if p.requires_grad]
        peft_lora.zero_grad()
        full = peft_full_head_loss(peft_lora, tokens, targets)
        full.backward()
    finally:
        hook.remove()
    assert seen == [(3, 4), (3, 20)]  # the head ran on 3 x 4 positions, then on all 3 x 20
    logits = peft_lora(input_ids=tokens).logits
    scored = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[scored], targets[scored])  # the mean over scored tokens
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, by_hand, rtol=1e-6, atol=0)
    full_grads = [p.grad for p in peft_lora.parameters() if p.requires_grad]
    for g, h in zip(ours_grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)
    peft_lora.zero_grad()


def test_the_bench_prints_json_and_its_depth_fit_predicts_the_full_depth(tmp_path):
    def bench(*extra):
        proc = subprocess.run([sys.executable, "bench/train_step.py", "--shape", "tiny", "--device", "cpu",
                               "--batch", "2", "--seq", "48", "--steps", "1", "--grad-checkpointing", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    fitted = bench("--depths", "4,3,5", "--out", str(tmp_path / "fit.json"))
    assert fitted == json.loads((tmp_path / "fit.json").read_text()) and fitted["complete"] is True
    whole = bench()  # the tiny shape has 2 layers
    impls = [r["impl"] for r in whole["results"]]
    assert impls in (["para-mini"], ["para-mini", "peft", "peft-full-head"])  # without and with PEFT installed
    rows = {r["impl"]: r for r in whole["results"]}
    for other, key in (("peft", "para_over_peft"), ("peft-full-head", "para_over_peft_full_head")):
        if other in rows:  # PARA's tokens/s and memory over PEFT's, like for like and in the usual form
            para, peft = rows["para-mini"], rows[other]
            assert whole[key] == [{"layers": 2, "tokens_per_s": para["tokens_per_s"] / peft["tokens_per_s"],
                                   "peak_mem": para["peak_mem_gib"] / peft["peak_mem_gib"]}]
    if "peft" in rows:  # logits at every position cost memory that the scored head does not take
        assert rows["peft"]["peak_mem_gib"] < rows["peft-full-head"]["peak_mem_gib"]
    for row in whole["results"]:
        assert row["tokens_per_s"] > 0 and row["layers"] == 2 and row["mfu"] is None  # no MFU on a CPU
        assert row["peak_mem_reserved_gib"] is None  # CUDA's allocator only
        fit = fitted["at_full_depth"][row["impl"]]
        assert fit["layers"] == 2 and fit["gib_per_layer"] > 0
        # three depths on one line, to a few 512-byte blocks, and the line through 3 to 5 layers lands on the
        # peak measured at 2
        assert fit["fit_max_residual_gib"] * 2**30 <= 4 * 512
        assert abs(fit["peak_mem_gib"] - row["peak_mem_gib"]) * 2**30 <= 4 * 512
