# LLaMA-2 with PARA / PARADE, in the order of the paper (parade_paper.txt, Section 3):
# config, norm and RoPE, attention (Eq. 1, 4), FFN (Eq. 2, 5), vector generator (Eq. 3, 6),
# attentional capsule pooler (Eq. 7-10), block, model; then the baselines LoRA, (IA)^3 and BitFit.
#
# Layout: the weights follow Hugging Face's rotate-half RoPE layout, so HF checkpoints load as they are and
# Meta / llama2.c checkpoints get their wq / wk rows permuted once on load (loading.py).
# Every tensor here is the paper's: a fine-tuning run attaches one adapter (adapters.py); serving many adapters in
# one batch wraps this model from outside (serving.py).
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: the same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's rule for the FFN width, used when hidden_dim is not given
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: Optional[int] = None  # the FFN width where a checkpoint states it (HF intermediate_size, llama2.c)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "dim must divide into heads and n_heads into n_kv_heads groups")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)  # SwiGLU has three matrices, so 2/3 of the usual 4 * dim
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)  # 7B: 11008


# ----------------------------------------------------------------------------------------------- norm and RoPE

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in fp32 (float64 too), rounded to x's dtype before the weight, exactly as Hugging
        # Face does; F.rms_norm computes in fp32 inside for bf16 / fp16, in one fused kernel on a GPU
        h = x.float() if x.dtype == torch.float64 else x
        return self.weight * F.rms_norm(h, x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, device=None):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # [head_dim / 2]


def rope(positions, head_dim: int, theta: float):
    """cos and signed sin for rotate-half RoPE at integer positions [B, T] -> [B, T, head_dim] each, in fp32:
    (cos a, cos a) and (-sin a, sin a) for the angles a of the two halves (see apply_rope)."""
    angles = positions[..., None].float() * rope_frequencies(head_dim, theta, positions.device)  # [B, T, hd / 2]
    sin = angles.sin()
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    # x: [B, H, T, hd]; rotate-half pairs channel i with i + hd/2 (the Hugging Face layout) and turns each pair by
    # its angle: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * sin, sin signed as rope() gives.
    # In x's dtype, as Hugging Face does: in bf16 / fp16 cos and sin are rounded first, then each product and the sum
    # (computing in fp32 and rounding once would differ from it in the last bit)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1); x2 * -sin is exactly -(x2 * sin)
    return x * cos[:, None] + swapped * sin[:, None]  # cos, sin broadcast over heads


# --------------------------------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, l: dict, cache: Optional[KVCache] = None, layer: int = 0):
        # l: this layer's vectors, made from the prompt (Block.forward): l["q"] is l_q [B, 1, n_heads * head_dim]
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # Eq. (1): Q = xW^Q, K = xW^K, V = xW^V
        q = l["q"] * q if "q" in l else q  # Eq. (4): Q' = l_q * Q
        k = l["k"] * k if "k" in l else k  # K' = l_k * K (PARADE-3)
        v = l["v"] * v if "v" in l else v  # Eq. (4): V' = l_v * V
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, n_heads, T, head_dim]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, n_kv_heads, T, head_dim]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # PARA scales Q before RoPE (docs/design.md decision 6)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, n_kv_heads, cached positions, head_dim]
        if T == 1 and mask is not None and self.n_kv_heads != self.n_heads:
            # one new token under a mask (a padded batch): each KV head's query heads as the rows of one attention, as
            # Hugging Face lays them out there (SDPA's CPU kernel rounds the two layouts differently)
            q = q.view(B, self.n_kv_heads, -1, self.head_dim)  # [B, n_kv_heads, n_heads / n_kv_heads, head_dim]
        # Eq. (1) / (4): softmax(Q'K^T / sqrt(head_dim)) V'; each KV head serves n_heads / n_kv_heads query heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=q.shape[1] != k.shape[1])
        out = out.view(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)  # [B, T, n_heads * hd]
        return self.wo(out)


# --------------------------------------------------------------------------------------------------------- FFN

class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # W^G, the Gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # W^U, the Up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # W^D, the Down

    def forward(self, x, l: dict):
        G, U = self.w1(x), self.w3(x)  # G = xW^G, U = xW^U
        G = l["g"] * G if "g" in l else G  # G' = l_g * G (PARADE-3)
        U = l["u"] * U if "u" in l else U  # Eq. (5): U' = l_u * U
        return self.w2(F.silu(G) * U)  # Eq. (2): (g(G) * U) W^D


# ------------------------------------------------------------------------------------------------ PARA / PARADE

def site_dims(args: ModelArgs) -> dict:
    """(input width, output width) of each projection."""
    q, kv, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    return {"q": (args.dim, q), "k": (args.dim, kv), "v": (args.dim, kv), "o": (q, args.dim),
            "g": (args.dim, ffn), "u": (args.dim, ffn), "d": (ffn, args.dim)}


def linear(d_in: int, d_out: int, bias: bool = False) -> nn.Linear:
    # made empty, to be initialised as the paper says: nn.Linear's own init would draw random numbers we throw away
    return nn.Linear(d_in, d_out, bias=bias, device="meta").to_empty(device=torch.get_default_device())


class VectorGenerator(nn.Module):
    """VG (Eq. 3, 6): l = GeLU(Pooler(h W_down)) W_up + b_up, then Split(l) into l_q, l_v, l_u (or any targets).

    At initialisation W_up = 0 and b_up = 1, so every vector is ones and the model is exactly the base model.
    """

    def __init__(self, args: ModelArgs, cfg):  # cfg: adapters.AdapterConfig (targets, r, pooler, K)
        super().__init__()
        self.targets, self.pooler = cfg.targets, cfg.pooler
        self.sizes = [site_dims(args)[t][1] for t in cfg.targets]  # d_out = dim(q) + dim(v) + d_ffn
        self.down = linear(args.dim, cfg.r)  # W_down
        self.up = linear(cfg.r, sum(self.sizes), bias=True)  # W_up, b_up
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.up.weight)
        nn.init.ones_(self.up.bias)
        if cfg.pooler in ("capsule", "routing"):
            self.pool = CapsulePooler(cfg.r, cfg.K, attentional=cfg.pooler == "capsule")

    def forward(self, h, mask):
        # h: the attention RMSNorm output [B, T, dim] (docs/design.md decision 1); mask: [B, T] True at prompt tokens.
        # Written so that the weights may also carry a leading batch axis, one per row (serving.py stacks them).
        W_down, W_up, b_up = self.down.weight, self.up.weight, self.up.bias
        h_prime = h.to(W_down.dtype) @ W_down.mT  # Eq. (6): h' = h W_down                         [B, T, r]
        if self.pooler in ("capsule", "routing"):
            z = self.pool(h_prime, mask)  # z = Pooler(h'), Eq. (7)-(10)                            [B, r]
        else:
            z = pool_last(h_prime, mask) if self.pooler == "last" else pool_mean(h_prime, mask)
        l = F.gelu(z)[:, None] @ W_up.mT + b_up[..., None, :]  # Eq. (6): l = g(z) W_up + b_up        [B, 1, d_out]
        l = l.to(h.dtype)  # the activations' dtype (the VG's weights may be fp32 master weights): one cast for all
        return dict(zip(self.targets, l.split(self.sizes, dim=-1)))  # Eq. (3), (6): l_q, l_v, l_u = Split(l)


def pool_last(h, mask):
    last = torch.where(mask, torch.arange(mask.shape[1], device=mask.device), -1).amax(-1)  # last prompt token
    return h[torch.arange(h.shape[0], device=h.device), last]


def pool_mean(h, mask):
    w = mask[..., None].to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


class CapsulePooler(nn.Module):
    """The attentional capsule pooler (Eq. 7-10): T_ins input capsules h'_j -> K output capsules of r / K."""

    def __init__(self, r: int, K: int, attentional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(K, r, r // K) * 0.02)  # W_k^cap, one per output capsule
        # v_k: PARADE initialises the routing logits with attention; PARADE-2 ("routing") starts them at zero
        self.query = nn.Parameter(torch.randn(K, r) * 0.02) if attentional else None

    def forward(self, h_prime, mask):
        # h_prime: h' [B, T, r]; mask: [B, T] True at prompt tokens
        W_cap, v_k = self.weight, self.query
        m = h_prime[:, None] @ W_cap  # Eq. (7): m_{j->k} = h'_j W_k^cap                          [B, K, T, r/K]
        if v_k is not None:
            logits = v_k @ h_prime.mT  # Eq. (9): m_jk = v_k^T h'_j                                [B, K, T]
        else:
            logits = h_prime.new_zeros(h_prime.shape[0], m.shape[1], h_prime.shape[1])
        c = self.capsules(logits, m, mask)
        logits = logits + (m @ c[..., None]).squeeze(-1)  # Eq. (10): m_jk += c_k . m_{j->k} (docs/design.md decision 2)
        c = self.capsules(logits, m, mask)
        return c.flatten(1)  # [c_1, ..., c_K] concatenated: [B, r]

    @staticmethod
    def capsules(logits, m, mask):
        n = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # Eq. (9), (10): softmax over j
        s = (n[:, :, None, :] @ m).squeeze(-2)  # Eq. (8): s_k = sum_j n_jk m_{j->k}            [B, K, r/K]
        return squash(s)  # Eq. (8)


def squash(s):
    # Eq. (8): c = |s|^2 / (1 + |s|^2) * s / |s|, written so that s = 0 gives 0 rather than 0 / 0
    norm2 = s.pow(2).sum(-1, keepdim=True)
    return s * norm2.clamp_min(1e-12).sqrt() / (1 + norm2)  # the clamp keeps the gradient of sqrt finite at 0


# ------------------------------------------------------------------------------------------------ block, model

class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.vg = None  # PARA's vector generator, once an adapter is attached (adapters.add_adapter)

    def forward(self, x, cos, sin, mask, prompt_mask=None, cache: Optional[KVCache] = None, layer: int = 0):
        h = self.attention_norm(x)
        if cache is not None and prompt_mask is None:
            l = cache.l[layer]  # decoding (or a prefill without PARA): the vectors made at the prefill
        else:
            l = {} if self.vg is None else self.vg(h, prompt_mask)  # Eq. (3): the VG reads the prompt's h
            if cache is not None:
                cache.l[layer] = l
        x = x + self.attention(h, cos, sin, mask, l, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x), l)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.adapter = None  # the attached adapter's settings (adapters.add_adapter), if any
        self.checkpointing = False  # recompute each block in the backward pass to save activation memory

    def forward(self, tokens, prompt_lens=None, pad=None, cache: Optional[KVCache] = None, logits_at=None):
        """tokens [B, T] -> logits [B, T, vocab]. prompt_lens [B]: each row's prompt tokens after its left padding
        (PARA pools only these). pad [B]: left padding per row (None: none). cache: from new_cache(); the first call
        is the prefill, later calls append tokens. logits_at: only these positions get logits (the head is the
        largest product of a short sequence): a slice along T (prefill: slice(-1, None)) or a bool mask [B, T]
        (training: the response tokens -> [N, vocab])."""
        B, T = tokens.shape
        static = cache is not None and cache.static  # fast.py's step: whole buffers read, every shape fixed
        prefill = cache is None or (not static and cache.n == 0)
        if cache is None:
            input_pos, end = torch.arange(T, device=tokens.device), T
        else:  # where these tokens go in the buffer, how far attention reads it, each row's left padding
            input_pos, end, pad = cache.prepare(B, T, pad, prefill)
        # a mask where keys must be hidden: a static step's unwritten positions, or a chunk of several new tokens
        masked = static or not (prefill or T == 1)
        cos, sin, mask = self.positions(input_pos, pad, cache.k.shape[3] if static else end, masked)
        prompt_mask = self.prompt_mask(T, prompt_lens, pad) if prefill else None
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, prompt_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, prompt_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:  # select before the norm: it is per position, so the result is the same
            h = h[logits_at] if isinstance(logits_at, torch.Tensor) else h[:, logits_at]
        return self.output(self.norm(h))

    def positions(self, input_pos, pad, n_keys: int, masked: bool):
        """RoPE's cos, sin at each token's position (after its row's left padding), and the attention mask over
        n_keys cached positions (None, where `masked` is False and no row is padded: plain causal)."""
        positions = input_pos[None] if pad is None else (input_pos[None] - pad[:, None]).clamp(min=0)  # [B or 1, T]
        cos, sin = rope(positions, self.args.head_dim, self.args.rope_theta)
        if pad is None and not masked:
            return cos, sin, None
        keys, query = torch.arange(n_keys, device=input_pos.device), input_pos[None, :, None]  # [n_keys], [1, T, 1]
        first = 0 if pad is None else pad[:, None, None]  # each row's first real token
        sees = (keys <= query) & (keys >= first) | (keys == query)  # causal, never a padding token (but itself: no
        # 0 / 0 in its softmax); made additive once here, where attention would convert a bool mask at every layer
        mask = torch.zeros(sees.shape, dtype=self.tok_embeddings.weight.dtype, device=sees.device)
        return cos, sin, mask.masked_fill(~sees, float("-inf"))[:, None]  # [B, 1, T, n_keys]

    def prompt_mask(self, T: int, prompt_lens, pad):
        """[B, T] True at the tokens PARA pools: each row's prompt, after its left padding."""
        if prompt_lens is None:
            if any(layer.vg is not None for layer in self.layers):
                raise ValueError("PARA pools the prompt: pass prompt_lens, each row's prompt length, so that the "
                                 "response and padding never enter the vector generator")
            return None
        t, first = torch.arange(T, device=self.output.weight.device), 0 if pad is None else pad[:, None]
        lens = torch.as_tensor(prompt_lens, device=t.device)[:, None]
        if (lens < 1).any() or (first + lens > T).any():
            raise ValueError(f"prompt_lens {lens.flatten().tolist()} must be >= 1 and fit in {T} tokens after padding")
        return (t >= first) & (t < first + lens)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        a, p = self.args, self.output.weight
        return KVCache(a.n_layers, batch_size, max_len or a.max_seq_len, a.n_kv_heads, a.head_dim, p.dtype, p.device)


# ------------------------------------------------------------------------- the baselines, side by side with PARA
# Each wraps a projection as PEFT does, sharing its frozen weight W, so that Attention and FeedForward call it as an
# nn.Linear. The learned tensors are kept in fp32 and used in the activations' dtype.

class LoRALinear(nn.Linear):
    """LoRA: y = W x + (alpha / r) B A x, unmerged (adapters.merge_lora folds B A into W)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.scaling = base.weight, alpha / r  # W: the frozen weight itself, not a copy
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # B = 0: at initialisation, the base model
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT and the LoRA paper's code do

    def forward(self, x):
        return super().forward(x) + (x @ self.A.to(x.dtype).mT) @ (self.B.to(x.dtype) * self.scaling).mT


class LearnedVector(nn.Module):
    """(IA)^3's and BitFit's learned vector, starting at `fill`. With proj > 0, the paper's variant that gives the
    vectors a budget like the other methods' (Section 4.1): fill + z W_proj, from a learned proj-dim z (from 0)."""

    def __init__(self, size: int, proj: int, fill: float):
        super().__init__()
        self.fill, self.z, self.proj = fill, None, None
        if proj:
            self.z = nn.Parameter(torch.zeros(proj))
            self.proj = nn.Parameter(torch.randn(proj, size) * 0.02)
        else:
            self.vector = nn.Parameter(torch.full((size,), fill))

    def forward(self):
        return self.vector if self.proj is None else self.fill + self.z[None] @ self.proj  # [size] or [1, size]


class IA3Linear(nn.Linear):
    """(IA)^3: y = l * (W x), a learned vector l per projection, the same for every prompt: PARA with W_up = 0 and
    b_up = l. Scaling U is the original's scaling of the FFN intermediate: (g(G) * (l * U)) W^D."""

    def __init__(self, base: nn.Linear, proj: int = 0):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.l = base.weight, LearnedVector(base.out_features, proj, fill=1.0)

    def forward(self, x):
        return self.l().to(x.dtype) * super().forward(x)


class BitFitLinear(nn.Linear):
    """BitFit-style learned biases (LLaMA-2 has none of its own): y = W x + b."""

    def __init__(self, base: nn.Linear, proj: int = 0):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.b = base.weight, LearnedVector(base.out_features, proj, fill=0.0)

    def forward(self, x):
        return super().forward(x) + self.b().to(x.dtype)
