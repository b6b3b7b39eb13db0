from pathlib import Path

import pytest
import torch

# Read-only shared materials (checkpoints, tokenizers, paper) live beside the project root, not inside it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/{'/'.join(parts)} not found: expected at {path}")
    return path


def random_hf_llama(seed=0, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn=96, vocab=128, std=0.2, **config):
    """A Hugging Face LlamaForCausalLM with random weights large enough that logits are O(1), norms included
    (all-ones norms would hide a swapped attention_norm / ffn_norm)."""
    import transformers  # test-only reference
    torch.manual_seed(seed)
    config = dict(rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False) | config
    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                                   num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                                   **config)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.5 * torch.rand_like(p) if "norm" in name else torch.randn_like(p) * std)
    return hf
