# What model.py needs only to cache and to serve many adapters at once: the per-row vectors a sequence carries,
# the KV cache they live in, and which adapter ("tenant") each row of a batch uses.
#
# Adapters with the same settings share one "bank" (an nn.ModuleList with one module per tenant). A single
# fine-tuning run is a bank of one, called as it is. A batch that mixes tenants stacks each row's own weights and runs
# the bank's first module with them in place of its parameters, so the equations in model.py never see tenants.
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call


class One(float):
    """l for a projection no adapter scales: l * y is y itself, without a multiply. A float 1.0 so that
    torch.compile, which does not call __mul__, can trace it too (there it multiplies by 1.0: exact, and fused)."""

    def __new__(cls):
        return super().__new__(cls, 1.0)

    def __mul__(self, y):
        return y


ONE = One()


class Vectors:
    """One layer's vectors for each row of a batch, made once per prompt and kept with the KV cache (Eq. 3):
    l["q"], l["v"], l["u"] are PARA's l_q, l_v, l_u (or (IA)^3's vectors); ONE where nothing scales a projection.
    The baselines' additive terms ride along: LoRA's x A^T B^T and BitFit's b, applied by add().
    A tensor is [B, ...] with one entry per row (3-D), or shared by every row (no row dimension, or B = 1).
    """

    def __init__(self):
        self.l = {}  # site -> [B, 1, d_out] or shared [1, d_out]
        self.b = {}  # site -> BitFit's bias, shaped like l
        self.lora = {}  # site -> [(A [B, r, d_in], B [B, d_out, r]), ...] or shared 2-D, alpha / r folded into B

    def __getitem__(self, site):
        return self.l.get(site, ONE)

    def add(self, site, x, y):
        """y = xW plus the baselines' terms: y + x A^T B^T (LoRA) + b (BitFit)."""
        for A, B in self.lora.get(site, ()):
            y = y + (x @ A.mT) @ B.mT
        return y + self.b[site] if site in self.b else y

    def __call__(self, site, x, y):
        """Everything the adapters do to projection `site`'s output y = xW: (y + x A^T B^T + b) * l."""
        return self[site] * self.add(site, x, y)

    def reorder(self, index):
        """Keep the rows `index` (beam search reorders hypotheses; the KV cache moves with them)."""
        pick = lambda t: t.index_select(0, index) if t.dim() == 3 and t.shape[0] > 1 else t  # 1 row: broadcasts
        self.l = {s: pick(t) for s, t in self.l.items()}
        self.b = {s: pick(t) for s, t in self.b.items()}
        self.lora = {s: [(pick(A), pick(B)) for A, B in ab] for s, ab in self.lora.items()}


@dataclass
class Prompt:
    mask: Optional[torch.Tensor]  # [B, T] True at the prompt tokens PARA pools
    slots: dict = field(default_factory=dict)  # bank name -> the tenant of every row, or a list: each row's (-1: none)


def make_vectors(banks: nn.ModuleDict, h, prompt: Prompt) -> Vectors:
    """Run every bank the batch uses on the prompt's hidden states h [B, T, dim]: one layer's Vectors."""
    vectors = Vectors()
    for name, slots in prompt.slots.items():
        bank = banks[name]
        if isinstance(slots, int):  # one adapter for every row: its module of model.py as it is
            out, slots = bank[slots](h, prompt.mask), None
        else:  # each row its own tenant's weights, [B, ...], in place of the first module's parameters
            out = functional_call(bank[0], tenant_rows(bank, slots), (h, prompt.mask))
            slots = torch.tensor(slots, device=h.device)
        for site, t in out.items():
            if bank.config.method == "lora":
                A, B = t
                vectors.lora.setdefault(site, []).append((A, identity_rows(B, slots, 0.0)))
            elif bank.config.method == "bitfit":
                b = identity_rows(t.to(h.dtype), slots, 0.0)
                vectors.b[site] = vectors.b[site] + b if site in vectors.b else b
            else:  # PARA's and (IA)^3's vectors; rows of two banks multiply (each is 1 where its bank is unused)
                l = identity_rows(t.to(h.dtype), slots, 1.0)
                vectors.l[site] = vectors.l[site] * l if site in vectors.l else l
    return vectors


def tenant_rows(bank: nn.ModuleList, slots: list) -> dict:
    """Each parameter of the bank with each row's own tenant's tensor, stacked [B, ...] (rows outside the bank take
    tenant 0; identity_rows then restores the identity there)."""
    tenants = {s: dict(bank[max(s, 0)].named_parameters()) for s in set(slots)}
    return {name: torch.stack([tenants[s][name] for s in slots]) for name in tenants[slots[0]]}


def identity_rows(t, slots, identity: float):
    """t [B, ...] with `identity` at the rows that use no tenant of this bank (slot -1)."""
    if slots is None:
        return t  # every row is the bank's one tenant
    return t.masked_fill((slots < 0).view(-1, *[1] * (t.dim() - 1)), identity)


def read_prompt(model, shape, prompt_lens, pad, adapters) -> Prompt:
    """Which tokens PARA pools (each row's prompt, after its left padding), and which adapter each row uses."""
    B, T = shape
    device = model.output.weight.device
    slots = resolve_slots(model.tenants, adapters, B)
    if prompt_lens is None:
        if any(model.layers[0].adapters[b].config.method == "para" for b in slots):
            raise ValueError("PARA pools the prompt: pass prompt_lens, each row's prompt length, so that the "
                             "response and padding never enter the vector generator")
        return Prompt(None, slots)
    t = torch.arange(T, device=device)[None]
    first = torch.zeros(B, 1, dtype=torch.long, device=device) if pad is None else pad[:, None].to(device)
    prompt_lens = torch.as_tensor(prompt_lens, device=device)
    if (prompt_lens < 1).any() or (first[:, 0] + prompt_lens > T).any():
        raise ValueError(f"prompt_lens {prompt_lens.tolist()} must be >= 1 and fit in {T} tokens after padding")
    return Prompt((t >= first) & (t < first + prompt_lens[:, None]), slots)


def resolve_slots(tenants: dict, adapters, B: int) -> dict:
    """Which tenant of which bank each row uses. tenants: adapter name -> (bank, slot); adapters: a name per row."""
    if adapters is None:
        if len(tenants) > 1:
            raise ValueError(f"{len(tenants)} adapters are attached ({', '.join(tenants)}): "
                             "pass adapters=[name or None per row]")
        return {bank: slot for bank, slot in tenants.values()}  # the single adapter, shared by every row
    if len(adapters) != B:
        raise ValueError(f"adapters names {len(adapters)} rows, the batch has {B}")
    unknown = sorted({a for a in adapters if a is not None and a not in tenants})
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; attached: {sorted(tenants) or 'none'}")
    slots = {}
    for row, name in enumerate(adapters):
        if name is not None:
            bank, slot = tenants[name]
            slots.setdefault(bank, [-1] * B)[row] = slot
    return {bank: s[0] if len(set(s)) == 1 and s[0] >= 0 else s for bank, s in slots.items()}


class KVCache(nn.Module):
    """One layer's keys and values, preallocated for max_len positions, plus the layer's Vectors."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.vectors: Optional[Vectors] = None  # made at prefill, reused at every decoded token

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"the KV cache holds {self.k.shape[2]} positions; position {end} was asked for")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Cache:
    """The model's cache: a KVCache per layer, each row's left padding (None: no row is padded, so decoding needs
    no attention mask), and how many positions are filled."""

    def __init__(self, layers, pad):
        self.layers, self.pad, self.pos = layers, pad, 0

    def reorder(self, index):
        if self.pos == 0:
            raise ValueError("reorder a cache after its prefill: before it there is nothing to reorder")
        for c in self.layers:
            c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)
            c.vectors.reorder(index)
        self.pad = None if self.pad is None else self.pad.index_select(0, index)
