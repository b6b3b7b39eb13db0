# python -m para_mini.equivalence: the streamed comparison with transformers, block by block. The streamed models
# compute what the whole ones compute; the report finds nothing on real and random checkpoints, and finds a
# difference planted in one block of one implementation in that block.
import sys

import pytest
import torch

from conftest import shared
from para_mini import AdapterConfig, add_adapter, load_model, save_adapter
from para_mini import equivalence
from para_mini.adapters import adapter_state
from para_mini.make_random_checkpoint import make

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """The 260K model's shape (grouped-query attention) with random weights, in three shards, no tokenizer."""
    out = tmp_path_factory.mktemp("random")
    make("stories260K", "bf16", out, shards=3, seed=1)
    return out


def table(printed: str) -> dict:
    """The report's block rows: {block: (same input, carried)}, and "embed": (None, carried)."""
    rows = {}
    for line in printed.splitlines():
        cells = line.split()
        if cells and (cells[0].isdigit() or cells[0] == "embed") and len(cells) in (2, 3):
            key = int(cells[0]) if cells[0].isdigit() else "embed"
            rows[key] = tuple(float(c) for c in cells[1:]) if key != "embed" else (None, float(cells[1]))
    return rows


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@torch.no_grad()
def test_the_streamed_models_give_load_model_s_and_from_pretrained_s_logits_bit_for_bit(dtype):
    import transformers
    path, torch_dtype = shared("assets", "stories260K", "hf"), equivalence.DTYPES[dtype]
    tokens = torch.randint(3, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    ours, _ = equivalence.ours_streamed(path, torch_dtype)
    hf, _ = equivalence.hf_streamed(path, torch_dtype)
    whole_hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    want = whole_hf(tokens).logits
    assert want.float().std() > 1.0
    assert torch.equal(hf(tokens).logits, want)
    assert torch.equal(ours(tokens), load_model(path, dtype=torch_dtype)(tokens))
    assert all(p.numel() > 1 and p.stride() == (0,) * p.dim() for p in hf.model.layers[0].parameters())  # stand-ins


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_command_finds_the_260K_model_the_same_bit_for_bit_block_by_block(dtype, capsys):
    code = equivalence.main(["--weights", str(shared("assets", "stories260K", "hf")), "--dtype", dtype,
                             "--new-tokens", "6"])
    printed = capsys.readouterr().out
    rows = table(printed)
    assert code == 0 and "verdict: the same, bit for bit" in printed
    assert len(rows) == 1 + 5 and all(v in (None, 0.0) for row in rows.values() for v in row)
    assert "logits: max |diff| 0.0, top-1 agreement 38 / 38 positions" in printed
    assert "prompt 'Once upon a time,'" in printed  # the built-in prompts, through the checkpoint's tokenizer


def test_the_command_finds_a_random_three_shard_checkpoint_the_same_with_token_id_prompts(random_checkpoint,
                                                                                          capsys):
    assert len(list(random_checkpoint.glob("model-0000?-of-00003.safetensors"))) == 3
    code = equivalence.main(["--weights", str(random_checkpoint), "--dtype", "fp32", "--new-tokens", "4"])
    printed = capsys.readouterr().out
    assert code == 0 and "verdict: the same, bit for bit" in printed, printed
    assert len(table(printed)) == 1 + 5
    assert "prompt [1, " in printed  # no tokenizer: the prompts are token ids


@torch.no_grad()
def test_a_difference_planted_in_one_block_of_one_implementation_is_found_in_that_block(random_checkpoint,
                                                                                      monkeypatch, capsys):
    read = equivalence.hf_tensor

    def planted(file, name, dtype):  # transformers' block 2 reads one weight slightly wrong
        t = read(file, name, dtype)
        return t * 1.01 if name == "model.layers.2.mlp.down_proj.weight" else t

    monkeypatch.setattr(equivalence, "hf_tensor", planted)
    prompts = [[1, 5, 9, 200, 7], [1, 300, 42]]
    report = equivalence.compare(random_checkpoint, prompts, torch.float32, new_tokens=2)
    assert report.embeddings == 0 and report.first_difference() == 2
    assert [d > 0 for d in report.same_input] == [False, False, True, False, False]  # only block 2's own output
    assert [d > 0 for d in report.carried] == [False, False, True, True, True]  # and everything after it
    assert report.logits > 0 and not report.exact()

    code = equivalence.main(["--weights", str(random_checkpoint), "--new-tokens", "1", "--atol", "0"])
    printed = capsys.readouterr().out
    assert code == 1 and "verdict: DIFFERENT" in printed and "block 2 is the first whose output differs" in printed


@pytest.mark.parametrize("method", ["lora", "ia3", "para"])
def test_the_command_compares_an_adapter_with_peft_s_or_the_hooked_paper_equations(method, tmp_path, capsys):
    if method != "para":
        pytest.importorskip("peft")
    path = shared("assets", "stories260K", "hf")
    model = add_adapter(load_model(path), AdapterConfig(method))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / "a.safetensors")
    prompts = [[1, 403, 29, 261, 407, 5], [1, 67, 400, 43, 3, 11, 333, 90, 7]]  # padded: of different lengths
    report = equivalence.compare(path, prompts, torch.float32, tmp_path / "a.safetensors", new_tokens=3)
    assert report.logits <= 1e-4 and report.top1[0] == report.top1[1] and report.ours == report.theirs
    with torch.no_grad():  # far more than that if transformers' side went without it
        tokens = torch.tensor(prompts[1:])
        assert (model(tokens, prompt_lens=[9]) - load_model(path)(tokens)).abs().max() > 0.1
    code = equivalence.main(["--weights", str(path), "--adapter", str(tmp_path / "a.safetensors"),
                             "--new-tokens", "2"])
    assert code == 0 and "verdict: " in capsys.readouterr().out


def test_without_transformers_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert equivalence.main(["--weights", "unused"]) == 2
    assert "pip install transformers" in capsys.readouterr().err


def test_a_bitfit_adapter_has_no_reference_to_compare_with(tmp_path, capsys):
    path = shared("assets", "stories260K", "hf")
    save_adapter(add_adapter(load_model(path), AdapterConfig("bitfit")), tmp_path / "b.safetensors")
    assert equivalence.main(["--weights", str(path), "--adapter", str(tmp_path / "b.safetensors")]) == 2
    assert "no PEFT form" in capsys.readouterr().err
