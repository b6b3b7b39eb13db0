# PARA / PARADE and the baselines, checked against transcriptions of the paper's equations and against
# Hugging Face + PEFT. Every reference here is computed independently of para_mini's forward pass.
import copy

import pytest
import torch

from conftest import shared
from hf_reference import HF_SITES, ours_from_hf, tiny_hf
from para_mini import (AdapterConfig, ModelArgs, Tenants, Transformer, add_adapter, load_adapter, merge_lora,
                       remove_adapter, save_adapter)
from para_mini.adapters import LINEARS, adapter_state, read_adapter, weights_digest
# the paper's equations loop by loop, and Hugging Face's model with PARA through hooks (shared with the command
# python -m para_mini.equivalence); written independently of model.py's VectorGenerator
from para_mini.equivalence import hf_with_para_hooks, vg_reference

POOLERS = ["capsule", "last", "routing", "mean"]
METHODS = ["para", "lora", "ia3", "bitfit", "ia3-proj", "bitfit-proj"]


def config(method):
    """The method's default settings; "-proj": the paper's budget variant of (IA)^3 / BitFit (Section 4.1)."""
    name, _, proj = method.partition("-")
    return AdapterConfig(name, proj=5 if proj else 0)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=80, max_seq_len=64)
    args.update(kw)
    model = Transformer(ModelArgs(**args)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def randomize(owner, name=None, seed=1, std=0.3):
    """Give an adapter non-trivial weights (at initialisation PARA, (IA)^3, LoRA and BitFit are all identities):
    the model's own, or the tenant `name` of a Tenants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (owner.state(name) if isinstance(owner, Tenants) else adapter_state(owner)).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("pooler", POOLERS)
def test_para_at_initialisation_is_the_base_model(pooler):
    model = tiny_model()
    tokens = torch.randint(0, 96, (3, 21))
    base = model(tokens)
    add_adapter(model, AdapterConfig("para", pooler=pooler, targets=("q", "k", "v", "g", "u")))
    assert torch.equal(model(tokens, prompt_lens=[4, 11, 21]), base)


@pytest.mark.parametrize("method", METHODS)
def test_every_adapter_at_initialisation_is_the_base_model(method):
    model = tiny_model()
    tokens = torch.randint(0, 96, (2, 15))
    base = model(tokens)
    add_adapter(model, config(method))
    assert torch.equal(model(tokens, prompt_lens=[4, 9]), base)


def test_the_projected_vectors_cost_proj_plus_proj_times_width_per_target_and_layer():
    from para_mini import count_parameters
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=80)
    widths = {"k": 24, "v": 24, "u": 80}
    assert count_parameters(args, AdapterConfig("ia3", proj=5)) == 2 * sum(5 + 5 * w for w in widths.values())
    assert count_parameters(args, AdapterConfig("ia3")) == 2 * sum(widths.values())
    with pytest.raises(ValueError, match="only \\(IA\\)\\^3 and BitFit take a projection"):
        AdapterConfig("lora", proj=4)


@pytest.mark.parametrize("pooler", POOLERS)
def test_each_pooler_equals_a_loop_by_loop_transcription_of_its_equations(pooler):
    model = tiny_model()
    cfg = AdapterConfig("para", pooler=pooler, r=12, K=4)
    add_adapter(model, cfg)
    randomize(model)
    vg = model.layers[0].vg
    torch.manual_seed(3)
    h = torch.randn(3, 10, model.args.dim)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4], mask[1, 2:10], mask[2, 5:6] = True, True, True  # right-, left- and single-token prompts
    got = vg(h, mask)
    t = {k[len("layers.0"):]: v for k, v in adapter_state(model).items() if k.startswith("layers.0.")}
    for b in range(3):
        want = vg_reference(h[b][mask[b]], t, ".vg", cfg, model.args)
        for site in cfg.targets:
            torch.testing.assert_close(got[site][b, 0], want[site], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooler", ["capsule", "last"])
@pytest.mark.parametrize("dtype,std,atol", [(torch.float64, 0.5, 1e-9), (torch.float32, 0.1, 1e-4)])
def test_para_on_the_260K_model_equals_hugging_face_with_hooks(pooler, dtype, std, atol):
    # float64 shows the two agree exactly with large vectors; in float32 large vectors amplify rounding in both
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(shared("assets", "stories260K", "hf")).eval().to(dtype)
    model = ours_from_hf(hf)
    cfg = AdapterConfig("para", pooler=pooler, targets=("q", "v", "u"))
    add_adapter(model, cfg)
    randomize(model, std=std)
    model.to(dtype)
    torch.manual_seed(0)
    tokens = torch.randint(3, 512, (2, 30))
    prompt_lens = [7, 19]
    with torch.no_grad():
        ours = model(tokens, prompt_lens=prompt_lens)
        base = Transformer.forward(ours_from_hf(hf), tokens)
        handles = hf_with_para_hooks(hf, adapter_state(model), cfg, prompt_lens)  # each row its own prompt
        theirs = hf(tokens).logits
        for h in handles:
            h.remove()
        for b in range(2):
            torch.testing.assert_close(ours[b], theirs[b], rtol=0, atol=atol)
            assert (ours[b] - base[b]).abs().max() > 1e-2  # and PARA really changes the model


def capture_vectors(model):
    seen = []
    hooks = [layer.vg.register_forward_hook(lambda m, i, o: seen.append(o)) for layer in model.layers]
    return seen, hooks


def test_only_the_prompt_is_pooled():
    model = tiny_model()
    add_adapter(model, AdapterConfig("para"))
    randomize(model)
    torch.manual_seed(5)
    prompt = torch.randint(0, 96, (1, 8))
    a = torch.cat([prompt, torch.randint(0, 96, (1, 6))], 1)  # prompt + a response
    b = torch.cat([prompt, torch.randint(0, 96, (1, 6))], 1)  # prompt + another response
    c = torch.cat([b, torch.full((1, 4), 7)], 1)  # right-padded
    d = torch.cat([torch.full((1, 3), 9), a], 1)  # left-padded
    seen, hooks = capture_vectors(model)
    with torch.no_grad():
        la = model(a, prompt_lens=[8])
        lb = model(b, prompt_lens=[8])
        lc = model(c, prompt_lens=[8])
        ld = model(d, prompt_lens=[8], pad=torch.tensor([3]))
    n = len(model.layers)
    for i in range(n):
        for site in ("q", "v", "u"):
            assert torch.equal(seen[i][site], seen[n + i][site])  # another response: the very same vectors
            # padding changes the shapes of the matrix products, so only rounding may differ
            torch.testing.assert_close(seen[i][site], seen[2 * n + i][site], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(seen[i][site], seen[3 * n + i][site], rtol=1e-6, atol=1e-6)
    assert torch.equal(la[:, :8], lb[:, :8])
    torch.testing.assert_close(lc[:, :14], lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld[:, 3:], la, rtol=1e-5, atol=1e-5)
    # and the prompt really is what matters: one different prompt token changes the vectors
    e = a.clone()
    e[0, 2] = (e[0, 2] + 1) % 96
    model(e, prompt_lens=[8])
    assert not torch.allclose(seen[0]["q"], seen[4 * n]["q"])
    for h in hooks:
        h.remove()


def test_cached_decoding_with_para_equals_the_full_forward_and_runs_the_generator_only_at_prefill():
    model = tiny_model()
    add_adapter(model, AdapterConfig("para"))
    randomize(model)
    torch.manual_seed(6)
    full = torch.randint(0, 96, (2, 16))
    pad = torch.tensor([0, 3])  # row 1 has a 3-token shorter prompt, left-padded
    prompt_lens = torch.tensor([9, 6])
    with torch.no_grad():
        want = model(full, prompt_lens=prompt_lens, pad=pad)
        seen, hooks = capture_vectors(model)
        cache = model.new_cache(2, 20)
        got = [model(full[:, :9], prompt_lens=prompt_lens, pad=pad, cache=cache)]
        assert len(seen) == len(model.layers)  # one VG call per layer, at prefill
        for t in range(9, 16):
            got.append(model(full[:, t:t + 1], cache=cache))
        assert len(seen) == len(model.layers)  # and none while decoding
    for h in hooks:
        h.remove()
    got = torch.cat(got, 1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], rtol=1e-5, atol=1e-5)


def peft_pair(method):
    peft = pytest.importorskip("peft")
    hf = tiny_hf()
    model = ours_from_hf(hf)
    if method == "lora":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(HF_SITES.values()))
    else:
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peft.get_peft_model(hf, cfg).eval()
    return model, pm


def test_lora_equals_peft_lora_with_the_same_weights():
    model, pm = peft_pair("lora")
    add_adapter(model, AdapterConfig("lora", r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for site, path in HF_SITES.items():
                mod = pm.get_submodule(f"base_model.model.model.layers.{i}.{path}")
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                B.copy_(torch.randn(B.shape, generator=g) * 0.2)
                layer.get_submodule(LINEARS[site]).A.copy_(A)
                layer.get_submodule(LINEARS[site]).B.copy_(B)
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ours, theirs = model(tokens), pm(input_ids=tokens).logits
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = base(input_ids=tokens).logits
    assert (theirs - plain).abs().max() > 1e-2  # the LoRA weights matter
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def set_peft_ia3(pm, model_sites, seed=0):
    """Random (IA)^3 vectors in PEFT; returns them as our k, v, u vectors per layer."""
    g = torch.Generator().manual_seed(seed)
    vectors = []
    with torch.no_grad():
        for i in range(len(pm.base_model.model.model.layers)):
            layer = {}
            for site, path in zip(("k", "v", "u"), ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")):
                l = pm.get_submodule(f"base_model.model.model.layers.{i}.{path}").ia3_l["default"]
                l.copy_(1 + 0.5 * torch.randn(l.shape, generator=g))
                layer[site] = l.detach().reshape(-1).clone()  # down_proj's input scaling is U's scaling
            vectors.append(layer)
    return vectors


def test_ia3_equals_peft_ia3_with_the_same_vectors():
    model, pm = peft_pair("ia3")
    vectors = set_peft_ia3(pm, ("k", "v", "u"))
    add_adapter(model, AdapterConfig("ia3"))
    with torch.no_grad():
        for layer, v in zip(model.layers, vectors):
            for site in ("k", "v", "u"):
                layer.get_submodule(LINEARS[site]).l.vector.copy_(v[site])
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), pm(input_ids=tokens).logits, rtol=0, atol=1e-5)


def test_para_with_zero_up_and_bias_c_equals_ia3_with_vector_c():
    model, pm = peft_pair("ia3")
    vectors = set_peft_ia3(pm, ("k", "v", "u"), seed=4)
    add_adapter(model, AdapterConfig("para", targets=("k", "v", "u"), pooler="capsule"))
    randomize(model)  # random W_down, capsules ... then W_up = 0 makes the prompt irrelevant
    with torch.no_grad():
        for layer, v in zip(model.layers, vectors):
            layer.vg.up.weight.zero_()
            layer.vg.up.bias.copy_(torch.cat([v["k"], v["v"], v["u"]]))
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, prompt_lens=[5, 12]), pm(input_ids=tokens).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_one_optimizer_step_changes_the_adapter_and_leaves_the_backbone_bit_identical(method):
    model = tiny_model()
    add_adapter(model, config(method))
    randomize(model, std=0.05)  # LoRA's B and PARA's W_up start at zero: give every tensor a gradient path
    model.train()
    ids = {id(p) for p in adapter_state(model).values()}
    backbone = {n: p.clone() for n, p in model.named_parameters() if id(p) not in ids}
    adapter = {n: p.clone() for n, p in model.named_parameters() if id(p) in ids}
    assert len(adapter) == len(ids) and all(p.requires_grad == (id(p) in ids) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 96, (2, 12))
    logits = model(tokens, prompt_lens=[5, 7])
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), n
        else:
            assert not torch.equal(p, adapter[n]), n


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_is_bit_exact(method, tmp_path):
    model = tiny_model()
    cfg = AdapterConfig(method, pooler="routing") if method == "para" else config(method)
    add_adapter(model, cfg)
    randomize(model)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(tiny_model(), tmp_path / "a.safetensors")
    assert fresh.adapter == cfg
    for (k, v), (k2, v2) in zip(adapter_state(model).items(), adapter_state(fresh).items()):
        assert k == k2 and torch.equal(v, v2), k
    tokens = torch.randint(0, 96, (2, 12))
    assert torch.equal(model(tokens, prompt_lens=[4, 6]), fresh(tokens, prompt_lens=[4, 6]))
    got_cfg, base, _ = read_adapter(tmp_path / "a.safetensors")
    assert got_cfg == cfg and base["dim"] == 48 and base["ffn_dim"] == 80


def test_para_file_holds_the_tensors_design_md_names():
    model = tiny_model()
    add_adapter(model, AdapterConfig("para", r=12, K=4))
    d_out = 48 + 24 + 80  # q (4 heads x 12) + v (2 kv heads x 12) + u (ffn 80)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(model).items() if k.startswith("layers.1.")}
    assert shapes == {"layers.1.vg.down.weight": (12, 48), "layers.1.vg.up.weight": (d_out, 12),
                      "layers.1.vg.up.bias": (d_out,), "layers.1.vg.pool.weight": (4, 12, 3),
                      "layers.1.vg.pool.query": (4, 12)}



def test_a_model_carries_one_adapter_of_plain_modules_and_tenants_are_kept_off_it():
    model = tiny_model()
    add_adapter(model, AdapterConfig("para", r=12, K=4))
    vg = model.layers[0].vg  # a fine-tuning run: W_down, W_up are linear layers, no tenant axis
    assert isinstance(vg.down, torch.nn.Linear) and vg.down.weight.shape == (12, 48)
    assert isinstance(vg.up, torch.nn.Linear) and vg.up.bias.shape == (48 + 24 + 80,)
    with pytest.raises(ValueError, match="already attached"):
        add_adapter(model, AdapterConfig("lora"))
    with pytest.raises(ValueError, match="carries an adapter of its own"):
        Tenants(model)
    remove_adapter(model)
    assert model.adapter is None and all(layer.vg is None for layer in model.layers)
    tenants = Tenants(model)
    tenants.add("a", AdapterConfig("para", r=12, K=4))
    before = {k: v.clone() for k, v in tenants.state("a").items()}
    tenants.add("b", AdapterConfig("lora"))
    assert list(tenants) == ["a", "b"] and all(torch.equal(v, before[k]) for k, v in tenants.state("a").items())
    assert all(layer.vg is None and type(layer.attention.wq) is torch.nn.Linear for layer in model.layers)
    with tenants.rows(["a", "b"]):  # installed for the batch only
        assert all(layer.vg is not None and type(layer.attention.wq) is not torch.nn.Linear for layer in model.layers)
    assert all(layer.vg is None and type(layer.attention.wq) is torch.nn.Linear for layer in model.layers)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    model = tiny_model()
    add_adapter(model, AdapterConfig("para"))
    save_adapter(model, tmp_path / "a.safetensors")
    other = tiny_model(dim=64)
    with pytest.raises(ValueError, match="trained for a base model of shape"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert other.adapter is None


def test_an_adapter_made_on_other_weights_of_the_same_shape_is_refused_unless_accepted(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    model = tiny_model(seed=0)
    add_adapter(model, AdapterConfig("para"))
    randomize(model)
    save_adapter(model, tmp_path / "a.safetensors")
    assert read_adapter(tmp_path / "a.safetensors")[1]["digest"] == weights_digest(model)
    assert load_adapter(tiny_model(seed=0).to(torch.bfloat16), tmp_path / "a.safetensors").adapter  # same weights
    other = tiny_model(seed=1)  # the same shape, other weights
    with pytest.raises(ValueError, match=r"other base weights of the same shape .*other_base=True"):
        load_adapter(other, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"other base weights of the same shape .*other_base=True"):
        Tenants(tiny_model(seed=1)).load(tmp_path / "a.safetensors")  # serving checks the same
    assert other.adapter is None
    assert load_adapter(other, tmp_path / "a.safetensors", other_base=True).adapter.method == "para"
    # a file written before the digest was recorded: its shape alone is checked
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "old.safetensors", metadata={k: v for k, v in meta.items() if k != "base_digest"})
    assert load_adapter(tiny_model(seed=1), tmp_path / "old.safetensors").adapter.method == "para"


def test_a_file_that_is_not_an_adapter_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors adapter"):
        load_adapter(tiny_model(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(tiny_model(), tmp_path / "missing.safetensors")


def test_merged_lora_equals_unmerged_lora():
    model = tiny_model()
    add_adapter(model, AdapterConfig("lora", r=4, alpha=8))
    randomize(model)
    tokens = torch.randint(0, 96, (2, 12))
    unmerged = model(tokens)
    merge_lora(model)
    assert model.adapter is None and all(type(layer.get_submodule(m)) is torch.nn.Linear
                                         for layer in model.layers for m in LINEARS.values())
    torch.testing.assert_close(model(tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_gives_every_row_what_its_adapter_gives_alone():
    model = tiny_model()
    tenants = Tenants(model)
    for i, (name, cfg) in enumerate([("p1", AdapterConfig("para")), ("p2", AdapterConfig("para")),
                                     ("last", AdapterConfig("para", pooler="last", r=6)),
                                     ("lo", AdapterConfig("lora")), ("ia", AdapterConfig("ia3")),
                                     ("bf", AdapterConfig("bitfit")), ("lo8", AdapterConfig("lora", r=8)),
                                     ("iak", AdapterConfig("ia3", targets=("k",), proj=3))]):
        tenants.add(name, cfg)
        randomize(tenants, name, seed=10 + i)
    names = ["p1", "lo", None, "p2", "ia", "bf", "last", "p1", "lo8", "iak"]
    torch.manual_seed(7)
    tokens = torch.randint(0, 96, (len(names), 14))
    prompt_lens = torch.randint(3, 14, (len(names),))
    with torch.no_grad():
        with tenants.rows(names):
            mixed = model(tokens, prompt_lens=prompt_lens)
        for b, name in enumerate(names):
            alone = copy.deepcopy(model)  # the adapter attached as a fine-tuning run attaches it
            if name is not None:
                add_adapter(alone, tenants.adapters[name][0])
                for p, q in zip(adapter_state(alone).values(), tenants.state(name).values()):
                    p.copy_(q)
            want = alone(tokens[b:b + 1], prompt_lens=prompt_lens[b:b + 1])
            torch.testing.assert_close(mixed[b], want[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[3])  # two PARA tenants really differ


def test_adapter_settings_are_checked():
    with pytest.raises(ValueError, match="unknown pooler"):
        AdapterConfig("para", pooler="max")
    with pytest.raises(ValueError, match="r % K"):
        AdapterConfig("para", r=10, K=4)
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfig("prefix")
    with pytest.raises(ValueError, match="PARA adjusts"):
        AdapterConfig("para", targets=("q", "o"))
    with pytest.raises(ValueError, match="must be a subset of"):
        AdapterConfig("lora", targets=("q", "x"))
    assert AdapterConfig("para", targets=("u", "q")).targets == ("q", "u")  # the file's row order, whatever is given
    tenants = Tenants(tiny_model())
    tenants.add("a", AdapterConfig("para"))
    with pytest.raises(ValueError, match="already loaded"):
        tenants.add("a", AdapterConfig("ia3"))
    with pytest.raises(KeyError, match="unknown adapter"):
        with tenants.rows(["a", "c"]):
            pass


def test_removing_a_tenant_then_adding_another_leaves_the_others_as_they_were():
    model = tiny_model()
    tenants = Tenants(model)
    tenants.add("A", AdapterConfig("ia3"))
    tenants.add("B", AdapterConfig("ia3", targets=("k",)))
    randomize(tenants, "B", seed=2)
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad(), tenants.rows(["B", "A"]):
        b_alone, _ = model(tokens)
    tenants.remove("A")
    tenants.add("C", AdapterConfig("ia3", targets=("v",)))
    randomize(tenants, "C", seed=3)
    with torch.no_grad(), tenants.rows(["B", "C"]):
        b_now, c_now = model(tokens)
    assert torch.equal(b_now, b_alone) and not torch.equal(c_now, b_now)


def test_changing_a_config_after_attaching_leaves_the_attached_one_alone():
    model = tiny_model()
    cfg = AdapterConfig("lora")
    add_adapter(model, cfg)
    cfg.r = 99
    assert model.adapter.r == 4 == AdapterConfig("lora").r


def test_merging_lora_is_refused_while_tenants_share_the_backbone():
    model = tiny_model()
    Tenants(model).add("y", AdapterConfig("ia3"))
    add_adapter(model, AdapterConfig("lora"))
    with pytest.raises(ValueError, match="every adapter served from it shares"):
        merge_lora(model)
    with pytest.raises(ValueError, match="only LoRA adapters can be merged"):
        merge_lora(add_adapter(tiny_model(), AdapterConfig("ia3")))


def test_para_needs_the_prompt_lengths():
    model = tiny_model()
    add_adapter(model, AdapterConfig("para"))
    with pytest.raises(ValueError, match="pass prompt_lens"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_the_squash_has_a_finite_gradient_at_zero():
    from para_mini.model import squash
    s = torch.zeros(2, 3, requires_grad=True)
    squash(s).sum().backward()
    assert torch.isfinite(s.grad).all()
    x = torch.tensor([3.0, 4.0])  # |s| = 5: 25 / 26 of the unit vector
    torch.testing.assert_close(squash(x), 25 / 26 * x / 5)
