# LLaMA-2 with PARA / PARADE, in the order of the paper (parade_paper.txt, Section 3):
# config, norm and RoPE, attention (Eq. 1, 4), FFN (Eq. 2, 5), vector generator (Eq. 3, 6),
# attentional capsule pooler (Eq. 7-10), block, model; then the baselines LoRA, (IA)^3 and BitFit.
#
# Layout: the weights follow Hugging Face's rotate-half RoPE layout, so HF checkpoints load as they are and
# Meta / llama2.c checkpoints get their wq / wk rows permuted once on load (loading.py).
# Caching, and serving many adapters in one batch, live in serving.py: here a fine-tuning run has one adapter.
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .serving import Cache, KVCache, Prompt, Vectors, make_vectors, read_prompt


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
        # x / sqrt(mean(x^2) + eps) in fp32, rounded to x's dtype before the weight, exactly as Hugging Face does
        # (so bf16 models agree with it). F.rms_norm computes in fp32 inside for a bf16 or fp16 x, and on a GPU
        # recent PyTorch runs it as one fused kernel where the formula written out takes seven (the norm runs twice
        # per layer at every decoded token); Hugging Face's fp32 holds for float64 too, hence that one cast.
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
    # its angle: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * sin, with sin signed as rope()
    # gives it; in fp32 at least. Four kernels (roll, mul, mul, add) where x * cos + cat(-x2, x1) * sin takes five,
    # for Q and K at every layer and every decoded token. (addcmul would save one more, but rounds differently.)
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    swapped = h.roll(h.shape[-1] // 2, dims=-1)  # (x2, x1)
    return (h * cos[:, None] + swapped * sin[:, None]).to(x.dtype)  # cos, sin broadcast over heads


# --------------------------------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, l: Vectors, cache: Optional[KVCache] = None, start: int = 0):
        # l: this layer's vectors, made from the prompt (Block.forward); l["q"] is l_q, and so on
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # Eq. (1): Q = xW^Q, K = xW^K, V = xW^V
        q, k, v = l.add("q", x, q), l.add("k", x, k), l.add("v", x, v)  # the baselines' LoRA / BitFit terms
        q, k, v = l["q"] * q, l["k"] * k, l["v"] * v  # Eq. (4): Q' = l_q * Q, V' = l_v * V (l_k: PARADE-3)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, n_heads, T, head_dim]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, n_kv_heads, T, head_dim]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # PARA scales Q before RoPE (DESIGN.md)
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, n_kv_heads, start + T, head_dim]
        # Eq. (1) / (4): softmax(Q'K^T / sqrt(head_dim)) V'; each KV head serves n_heads / n_kv_heads query heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(B, T, -1)  # [B, T, n_heads * head_dim]
        return l("o", out, self.wo(out))  # the baselines may touch W^O; PARA does not


# --------------------------------------------------------------------------------------------------------- FFN

class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # W^G, the Gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # W^U, the Up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # W^D, the Down

    def forward(self, x, l: Vectors):
        G, U = l.add("g", x, self.w1(x)), l.add("u", x, self.w3(x))  # G = xW^G, U = xW^U (+ the baselines' terms)
        G, U = l["g"] * G, l["u"] * U  # Eq. (5): U' = l_u * U (G' = l_g * G: PARADE-3)
        h = F.silu(G) * U  # Eq. (2): (g(G) * U) W^D
        return l("d", h, self.w2(h))


# ------------------------------------------------------------------------------------------------ PARA / PARADE

# The seven projections an adapter can touch. q, k, v, g, u are the paper's Query, Key, Value, Gate and Up;
# o and d are the attention output and FFN Down projections (LoRA and BitFit may use them).
SITES = ("q", "k", "v", "o", "g", "u", "d")
LINEARS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "g": "feed_forward.w1", "u": "feed_forward.w3", "d": "feed_forward.w2"}  # each site's module in a Block
DEFAULT_TARGETS = {"para": ("q", "v", "u"), "ia3": ("k", "v", "u"), "lora": SITES, "bitfit": SITES}


@dataclass
class AdapterConfig:
    method: str = "para"  # para | lora | ia3 | bitfit
    targets: tuple = ()  # empty: the method's default (DEFAULT_TARGETS)
    r: int = 0  # PARA: the vector generator's bottleneck (default 12); LoRA: the rank (default 4)
    pooler: str = "capsule"  # PARA: capsule (PARADE) | last (PARA, PARADE-1) | routing (PARADE-2) | mean
    K: int = 4  # PARA: number of output capsules
    alpha: float = 8.0  # LoRA: the update is scaled by alpha / r
    proj: int = 0  # (IA)^3, BitFit: > 0 makes the vectors from a learned proj-dim vector (paper, Section 4.1)

    def __post_init__(self):
        if self.method not in DEFAULT_TARGETS:
            raise ValueError(f"unknown adapter method {self.method!r}; choose one of {sorted(DEFAULT_TARGETS)}")
        targets = tuple(self.targets or DEFAULT_TARGETS[self.method])
        if set(targets) - set(SITES):
            raise ValueError(f"adapter targets must be a subset of {SITES}, got {targets}")
        self.targets = tuple(t for t in SITES if t in targets)  # one canonical order: the order of the file's rows
        self.r = self.r or {"para": 12, "lora": 4}.get(self.method, 0)
        if self.proj < 0 or (self.proj and self.method not in ("ia3", "bitfit")):
            raise ValueError(f"proj={self.proj}: only (IA)^3 and BitFit take a projection, and it must be >= 0")
        if self.method == "para":
            if self.pooler not in ("capsule", "last", "routing", "mean"):
                raise ValueError(f"unknown pooler {self.pooler!r}; choose capsule, last, routing or mean")
            if "o" in self.targets or "d" in self.targets:
                raise ValueError("PARA adjusts q, k, v, g and u only (the paper's Query, Key, Value, Gate, Up)")
            if self.pooler in ("capsule", "routing") and self.r % self.K:
                raise ValueError(f"the capsule pooler splits r={self.r} into K={self.K} capsules: r % K must be 0")


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

    def __init__(self, args: ModelArgs, cfg: AdapterConfig):
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
        # h: the attention RMSNorm output of the layer [B, T, dim] (DESIGN 1); mask: [B, T] prompt tokens.
        # The weights broadcast over the batch; a batch mixing tenants gives each row its own (serving.py).
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
        logits = logits + (m @ c[..., None]).squeeze(-1)  # Eq. (10): m_jk <- m_jk + c_k . m_{j->k} (DESIGN 2)
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
        self.adapters = nn.ModuleDict()  # bank name -> one VectorGenerator / IA3 / LoRA / BitFit per tenant

    def forward(self, x, cos, sin, mask, prompt: Optional[Prompt], cache: Optional[KVCache] = None, start=0):
        h = self.attention_norm(x)
        if prompt is None:
            l = cache.vectors  # decoding: the vectors were made at prefill; the VG is not called again
        else:
            l = make_vectors(self.adapters, h, prompt)  # Eq. (3): the VG reads the prompt's h at this layer
            if cache is not None:
                cache.vectors = l
        x = x + self.attention(h, cos, sin, mask, l, cache, start)
        return x + self.feed_forward(self.ffn_norm(x), l)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tenants = {}  # adapter name -> (bank name, slot); filled by para_mini.adapters
        self.checkpointing = False  # recompute each block in the backward pass to save activation memory

    def forward(self, tokens, prompt_lens=None, pad=None, cache: Optional[Cache] = None, adapters=None,
                logits_at=None):
        """tokens [B, T] -> logits [B, T, vocab].

        prompt_lens: [B] prompt tokens per row, after any left padding (PARA pools only these; needed with PARA).
        pad: [B] left-padding per row (batched prompts of different lengths); None: no left padding.
        cache: from new_cache(); the first call is the prefill, each later call appends tokens.
        adapters: the adapter name of each row (None: the base model); None: the one attached adapter, if any.
        logits_at: only these positions get logits, as the [B, T, dim] x [dim, vocab] head is the largest single
            product of a short sequence: an index or slice along T (generation's prefill: slice(-1, None) ->
            [B, 1, vocab]) or a bool mask [B, T] (training: the response tokens -> [N, vocab], row by row).
        """
        start = 0 if cache is None else cache.pos
        if cache is not None:
            if start == 0:  # the prefill sets each row's left padding for the cache's life
                cache.pad = None if pad is None else pad.to(tokens.device)
            pad = cache.pad
        cos, sin, mask = self.positions(tokens.shape, start, pad, tokens.device)
        # at the prefill: which tokens PARA pools (the prompt's only) and which adapter each row uses
        prompt = read_prompt(self, tokens.shape, prompt_lens, pad, adapters) if start == 0 else None
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            c = None if cache is None else cache.layers[i]
            if self.checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, prompt, c, start,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, prompt, c, start)
        if cache is not None:
            cache.pos += tokens.shape[1]
        if logits_at is not None:  # select before the norm: it is per position, so the result is the same
            h = h[logits_at] if isinstance(logits_at, torch.Tensor) else h[:, logits_at]
        return self.output(self.norm(h))

    def positions(self, shape, start: int, pad, device):
        """RoPE's cos, sin at each token's position, and the attention mask (None: plain causal)."""
        B, T = shape
        idx = start + torch.arange(T, device=device)  # position in the sequence buffer
        positions = idx[None].expand(B, T) if pad is None else (idx[None] - pad[:, None]).clamp(min=0)
        cos, sin = rope(positions, self.args.head_dim, self.args.rope_theta)
        if pad is None and (start == 0 or T == 1):  # no padding: a prompt is plain causal, a new token sees all
            return cos, sin, None
        keys = torch.arange(start + T, device=device)
        first = torch.zeros(B, dtype=torch.long, device=device) if pad is None else pad
        mask = (keys[None, None] <= idx[None, :, None]) & (keys[None, None] >= first[:, None, None])
        return cos, sin, (mask | (keys[None, None] == idx[None, :, None]))[:, None]  # padding sees itself: no 0/0

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> Cache:
        a, p = self.args, self.output.weight
        max_len = max_len or a.max_seq_len
        layers = [KVCache(batch_size, max_len, a.n_kv_heads, a.head_dim, p.dtype, p.device) for _ in self.layers]
        return Cache(layers, pad=None)


# ------------------------------------------------------------------------- the baselines, side by side with PARA

class IA3(nn.Module):
    """(IA)^3: one learned vector per target, the same for every prompt (PARA with W_up = 0, b_up = the vector).

    Scaling U is the original's scaling of the FFN intermediate: (g(G) * U * l) W^D = (g(G) * (l * U)) W^D.
    With cfg.proj > 0, the paper's variant that gives the vectors a budget like the other methods' (Section 4.1):
    each is made from a learned proj-dim vector z through a learned projection, fill + z W_proj (z starts at 0).
    """
    fill = 1.0  # the identity of a scale

    def __init__(self, args: ModelArgs, cfg: AdapterConfig):
        super().__init__()
        dims = site_dims(args)
        if cfg.proj:
            self.z = nn.ParameterDict({t: nn.Parameter(torch.zeros(cfg.proj)) for t in cfg.targets})
            self.proj = nn.ParameterDict({t: nn.Parameter(torch.randn(cfg.proj, dims[t][1]) * 0.02)
                                          for t in cfg.targets})
        else:
            self.vectors = nn.ParameterDict({t: nn.Parameter(torch.full((dims[t][1],), self.fill))
                                             for t in cfg.targets})

    def forward(self, h=None, mask=None):
        """site -> the learned vector [1, d_out], whatever the prompt ([B, 1, d_out]: each row's own)."""
        if hasattr(self, "vectors"):
            return {site: v.unsqueeze(-2) for site, v in self.vectors.items()}
        return {site: self.fill + z.unsqueeze(-2) @ self.proj[site] for site, z in self.z.items()}


class BitFit(IA3):
    """BitFit-style learned biases on the chosen projections (LLaMA-2 has none of its own): made as (IA)^3's
    vectors are, but starting at 0 and added to the projection rather than multiplied (serving.make_vectors)."""
    fill = 0.0  # the identity of a bias


class LoRA(nn.Module):
    """LoRA: y = xW + (alpha / r) x A^T B^T, unmerged, so each row of a batch can carry its own A and B."""

    def __init__(self, args: ModelArgs, cfg: AdapterConfig):
        super().__init__()
        dims = site_dims(args)
        self.scaling = cfg.alpha / cfg.r
        self.A = nn.ParameterDict({t: nn.Parameter(torch.empty(cfg.r, dims[t][0])) for t in cfg.targets})
        self.B = nn.ParameterDict({t: nn.Parameter(torch.zeros(dims[t][1], cfg.r)) for t in cfg.targets})
        for A in self.A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT and the LoRA paper's code do

    def forward(self, h, mask=None):
        # site -> (A, alpha / r * B) in the activations' dtype, for y + x A^T B^T (serving.Vectors.add)
        return {site: (self.A[site].to(h.dtype), self.B[site].to(h.dtype) * self.scaling) for site in self.A}


METHODS = {"para": VectorGenerator, "ia3": IA3, "lora": LoRA, "bitfit": BitFit}
