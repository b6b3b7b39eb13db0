# LoRA and (IA)^3 adapters in PEFT's own format, both ways: our export loads into PEFT and gives our logits, a
# PEFT-made adapter loads into para_mini and gives PEFT's; the files are written and read without peft installed.
import json
import sys

import pytest
import torch

from hf_reference import HF_SITES, ours_from_hf, tiny_hf
from para_mini import AdapterConfig, add_adapter, load_adapter, save_adapter
from para_mini.adapters import adapter_state

# (IA)^3 on u is PEFT's down_proj in feedforward_modules; q, o, g and d are output scalings like k and v
CONFIGS = {"lora": AdapterConfig("lora", r=4, alpha=8), "lora-qv": AdapterConfig("lora", ("q", "v"), r=2, alpha=3.5),
           "ia3": AdapterConfig("ia3"), "ia3-qogd": AdapterConfig("ia3", ("q", "o", "g", "d"))}


def randomized(model, cfg, seed=0, std=0.3):
    add_adapter(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_our_adapter_saved_in_peft_format_loads_into_peft_with_our_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    hf = tiny_hf()
    model = randomized(ours_from_hf(hf), CONFIGS[name])
    save_adapter(model, tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    theirs = pm(input_ids=tokens).logits
    with pm.disable_adapter():
        assert (pm(input_ids=tokens).logits - theirs).abs().max() > 0.1  # PEFT really applies it
    torch.testing.assert_close(model(tokens), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@torch.no_grad()
def test_an_adapter_peft_made_loads_into_para_mini_with_peft_s_logits(method, tmp_path):
    peft = pytest.importorskip("peft")
    hf = tiny_hf()
    model = ours_from_hf(hf)
    if method == "lora":
        cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                              task_type="CAUSAL_LM")
    else:  # PEFT's own (IA)^3 targets for LLaMA
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(2)
    for n, p in pm.named_parameters():
        if "lora_" in n or "ia3_l" in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    want = {"lora": AdapterConfig("lora", ("q", "v", "g", "d"), r=4, alpha=16), "ia3": AdapterConfig("ia3")}[method]
    assert model.adapter == want
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(tokens), pm(input_ids=tokens).logits, rtol=0, atol=1e-5)


def test_peft_files_are_written_and_read_without_peft_or_transformers(tmp_path, monkeypatch):
    for name in ("peft", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    from para_mini import ModelArgs, Transformer
    torch.manual_seed(0)
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=80)
    for name, cfg in CONFIGS.items():
        model = randomized(Transformer(args), cfg)
        save_adapter(model, tmp_path / name, format="peft")
        fresh = load_adapter(Transformer(args), tmp_path / name)
        assert fresh.adapter == cfg
        for (k, v), (k2, v2) in zip(adapter_state(model).items(), adapter_state(fresh).items()):
            assert k == k2 and torch.equal(v, v2), k
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["target_modules"], config["feedforward_modules"]) == \
        ("IA3", ["down_proj", "k_proj", "v_proj"], ["down_proj"])
    config = json.loads((tmp_path / "lora-qv" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == \
        ("LORA", 2, 3.5, ["q_proj", "v_proj"])
    from safetensors import safe_open
    with safe_open(str(tmp_path / "lora-qv" / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] == (2, 48)
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] == (24, 2)
    assert len(shapes) == 2 * 2 * 2


@pytest.mark.parametrize("cfg,why", [
    (AdapterConfig("para"), "a para adapter has no PEFT form"),
    (AdapterConfig("bitfit"), "a bitfit adapter has no PEFT form"),
    (AdapterConfig("ia3", proj=4), "through a projection"),
    (AdapterConfig("ia3", ("k", "u", "d")), "on both u and d")])
def test_an_adapter_without_a_peft_form_is_refused_with_the_reason(cfg, why, tmp_path):
    from para_mini import ModelArgs, Transformer
    model = add_adapter(Transformer(ModelArgs(dim=48, n_layers=1, n_heads=4, vocab_size=96, hidden_dim=80)), cfg)
    with pytest.raises(ValueError, match=why):
        save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("setting,value", [("use_dora", True), ("use_rslora", True), ("bias", "all"),
                                           ("layers_to_transform", [0]), ("peft_type", "PREFIX_TUNING")])
def test_peft_settings_para_mini_does_not_compute_are_refused_by_name(setting, value, tmp_path):
    from para_mini import ModelArgs, Transformer
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, vocab_size=96, hidden_dim=80)
    save_adapter(randomized(Transformer(args), CONFIGS["lora"]), tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {setting: value}))
    with pytest.raises(ValueError, match=setting if setting != "peft_type" else "PREFIX_TUNING"):
        load_adapter(Transformer(args), tmp_path)


def test_every_projection_s_peft_name_is_hugging_face_s():
    from para_mini.peft_format import MODULES
    assert MODULES == HF_SITES
