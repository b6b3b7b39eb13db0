# load_model on every checkpoint layout it accepts (Hugging Face, Meta with model-parallel shards, llama2.c .bin
# and .pt), and the errors it gives for bad input. The Meta files are written here from a Hugging Face model with
# the inverse of Hugging Face's own conversion, so the loader's RoPE permutation is checked against an independent
# transcription.
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import para_mini.loading as loading
from conftest import random_hf_llama, shared
from para_mini import load_model

TOL = 1e-4
TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))

META_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
# Meta's llama/model.py: ColumnParallelLinear splits its output features (dim 0), RowParallelLinear its input
# features (dim 1), ParallelEmbedding the embedding features (dim 1); norms are replicated in every shard
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def unpermute(w, n_heads):
    # the inverse of transformers' convert_llama_weights_to_hf permute(): rotate-half rows back to interleaved
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(hf):
    c, sd = hf.config, hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        for theirs, ours in META_NAMES.items():
            out[f"layers.{i}.{ours}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
        for w, n_heads in (("wq", c.num_attention_heads), ("wk", c.num_key_value_heads)):
            out[f"layers.{i}.attention.{w}.weight"] = unpermute(out[f"layers.{i}.attention.{w}.weight"], n_heads)
    head_dim = c.hidden_size // c.num_attention_heads
    out["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # as Meta's files have
    return out


def write_meta(path, hf, params, n_shards):
    path.mkdir()
    (path / "params.json").write_text(json.dumps(params))
    for s in range(n_shards):
        shard = {}
        for name, w in meta_state_dict(hf).items():
            dim = META_SPLIT.get(name.split(".")[-2])
            shard[name] = w.clone() if dim is None else w.chunk(n_shards, dim)[s].clone()
        torch.save(shard, path / f"consolidated.{s:02d}.pth")
    return path


# dim 64 gives Meta's FFN int(2 * 4 * 64 / 3) = 170; times 0.5 is 85, rounded up to a multiple of 32: 96
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
               "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def hf():
    return random_hf_llama(n_heads=8, n_kv_heads=2, ffn=96)


@pytest.fixture
def hf_dir(tmp_path, hf):
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def logits_equal_hf(model, hf):
    with torch.no_grad():
        ref = hf(TOKENS).logits
        return ref.std() > 1.0 and (model(TOKENS) - ref).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------- formats

def test_a_two_shard_meta_checkpoint_loads_to_the_single_shard_model_and_both_equal_hugging_face(tmp_path, hf):
    one = load_model(write_meta(tmp_path / "one", hf, META_PARAMS, 1))
    two = load_model(write_meta(tmp_path / "two", hf, META_PARAMS, 2))
    assert one.args.ffn_dim == 96 and one.args.vocab_size == 128  # from ffn_dim_multiplier, and the embedding
    assert one.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert logits_equal_hf(one, hf) and logits_equal_hf(two, hf)


def test_a_sharded_hugging_face_checkpoint_with_an_index_equals_hugging_face(tmp_path, hf):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert logits_equal_hf(load_model(tmp_path), hf)


def test_a_llama2c_pt_checkpoint_loads_equal_to_the_bin(tmp_path):
    weights = torch.load(shared("assets", "stories260K", "meta", "consolidated.00.pth"), weights_only=True)
    weights["output.weight"] = weights["tok_embeddings.weight"]  # llama2.c ties them: one tensor, saved once
    checkpoint = {  # the shape of llama2.c train.py's checkpoint, from a torch.compile'd model
        "model": {"_orig_mod." + k: v for k, v in weights.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
        "model_args": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                           max_seq_len=512, dropout=0.0),
        "iter_num": 1000, "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 128},
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    pt = load_model(tmp_path / "ckpt.pt")
    binary = load_model(shared("assets", "stories260K", "stories260K.bin"))
    assert pt.output.weight is pt.tok_embeddings.weight
    assert pt.state_dict().keys() == binary.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(pt.state_dict().values(), binary.state_dict().values()))


def test_bf16_loads_in_bf16_on_a_model_built_on_the_meta_device(monkeypatch, hf_dir):
    built_on = []

    def spy(args):  # where the Transformer's weights live right after construction
        model = loading.Transformer.__wrapped__(args)
        built_on.append(model.output.weight.device.type)
        return model

    spy.__wrapped__ = loading.Transformer
    monkeypatch.setattr(loading, "Transformer", spy)
    model = load_model(hf_dir, dtype=torch.bfloat16, max_seq_len=77)
    assert built_on == ["meta"]  # no random fp32 initialisation of a full model before the weights arrive
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.args.max_seq_len == 77 and model.new_cache(1).k.shape[3] == 77


# ----------------------------------------------------------------------------------------------- errors

def edit_safetensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        load_model(tmp_path / "nowhere")


def test_a_missing_shard_is_named(tmp_path, hf):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"{second.name} not found"):
        load_model(tmp_path)
    meta = write_meta(tmp_path / "meta", hf, META_PARAMS, 3)
    (meta / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match="a shard is missing"):
        load_model(meta)


def test_a_truncated_bin_is_reported_as_truncated(tmp_path):
    data = shared("assets", "stories260K", "stories260K.bin").read_bytes()
    assert len(data) == 1_056_540
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="1056536 bytes, but its header .* needs 1056540: the file is truncated"):
        load_model(tmp_path / "cut.bin")
    (tmp_path / "long.bin").write_bytes(data + bytes(4))
    with pytest.raises(ValueError, match="needs 1056540: not a llama2.c v0 .bin"):
        load_model(tmp_path / "long.bin")


def test_a_truncated_safetensors_or_pth_file_is_reported(tmp_path, hf_dir):
    file = hf_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors: cannot read it as safetensors .* truncated"):
        load_model(hf_dir)
    meta = shutil.copytree(shared("assets", "stories260K", "meta"), tmp_path / "meta")
    shard = meta / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read it as a PyTorch zip checkpoint"):
        load_model(meta)


def test_a_wrong_shape_names_the_tensor(hf_dir):
    edit_safetensors(hf_dir, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                 t["model.layers.1.self_attn.k_proj.weight"][:-1].clone()}))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.weight \(in .*\) has shape \[15, 64\], "
                                         r"the model expects \[16, 64\]"):
        load_model(hf_dir)


def test_a_missing_or_unexpected_tensor_is_named(hf_dir):
    edit_safetensors(hf_dir, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.mlp\.up_proj\.weight\. "):
        load_model(hf_dir)
    edit_safetensors(hf_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64),
                                                 "model.layers.0.mlp.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected tensors: model.layers.0.mlp.bias"):
        load_model(hf_dir)


def test_a_config_that_does_not_fit_its_checkpoint_is_summarised_not_listed_tensor_by_tensor(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 32, "intermediate_size": 128}))
    with pytest.raises(ValueError) as e:
        load_model(hf_dir)
    message = str(e.value)
    # 270 missing tensors and 6 of the wrong shape: the first few of each, and how many more
    assert "missing tensors: model.layers.2." in message and "and 265 more" in message
    assert "tensors of the wrong shape (6): model.layers.0.mlp." in message and "and 3 more" in message
    assert len(message) < 1500, len(message)


def test_meta_params_that_give_another_ffn_width_are_refused(tmp_path, hf):
    with pytest.raises(ValueError, match="the FFN is 96 wide, .* give 192"):
        load_model(write_meta(tmp_path / "meta", hf, META_PARAMS | {"ffn_dim_multiplier": None}, 1))


@pytest.mark.parametrize("edit, match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE scaling"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"attention_bias": True}, "biases"),
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"head_dim": 16}, "head_dim 16 is not"),
])
def test_hugging_face_configs_the_model_does_not_implement_are_refused(hf_dir, edit, match):
    config = json.loads((hf_dir / "config.json").read_text()) | edit
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_model(hf_dir)


def test_an_unknown_format_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("weights coming soon")
    with pytest.raises(ValueError, match="unknown checkpoint directory"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_model(tmp_path / "README.md")
    (tmp_path / "noise.bin").write_bytes(torch.randn(300, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(ValueError, match="not a llama2.c"):
        load_model(tmp_path / "noise.bin")
    (tmp_path / "noise.pt").write_bytes(b"not a pickle " * 20)
    with pytest.raises(ValueError, match="cannot read it as a PyTorch zip checkpoint"):
        load_model(tmp_path / "noise.pt")
    torch.save({"tok_embeddings.weight": torch.zeros(2)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="pass its directory, with params.json"):
        load_model(tmp_path / "consolidated.00.pth")


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for a checkpoint that runs arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model_args": {"dim": 64}, "model": RunsCode(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="refused to unpickle.*could run code.*io.open"):
        load_model(tmp_path / "ckpt.pt")
    assert not marker.exists()
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.exists()
