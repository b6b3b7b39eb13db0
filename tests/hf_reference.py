# Test helpers that build the independent reference: a Hugging Face LlamaForCausalLM and our model holding the
# same weights. The copy is a plain renaming (our weights are in Hugging Face's layout), written here rather than
# through para_mini.load_model so that the PARA tests do not lean on the loader under test elsewhere.
import torch

from para_mini import ModelArgs, Transformer

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
HF_SITES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "g": "mlp.gate_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"}


def tiny_hf(seed=0, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96, vocab=128, std=0.1):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                                   num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                                   rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                                   tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(1.0)
    return hf


def ours_from_hf(hf) -> Transformer:
    c = hf.config
    args = ModelArgs(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                     norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings)
    model = Transformer(args)
    hsd = hf.state_dict()
    sd = {"tok_embeddings.weight": hsd["model.embed_tokens.weight"], "norm.weight": hsd["model.norm.weight"],
          "output.weight": hsd["lm_head.weight"]}
    for i in range(args.n_layers):
        for ours, theirs in HF_NAMES.items():
            sd[f"layers.{i}.{ours}.weight"] = hsd[f"model.layers.{i}.{theirs}.weight"]
    model.load_state_dict({k: v.clone() for k, v in sd.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
