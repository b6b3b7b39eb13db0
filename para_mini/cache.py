# The KV cache: every layer's keys and values, preallocated, written at positions held in a tensor (gpt-fast's
# KVCache.update), and the vectors PARA made from each prompt. Eager decoding reads it up to the filled length;
# fast.py's captured step reads it whole, through a mask, so that its shapes never change.
from typing import Optional

import torch


class KVCache:
    """Every layer's keys and values, preallocated (gpt-fast's KVCache), and its vectors l (PARA's l_q, l_v, l_u),
    made from each prompt at its prefill and reused for every later token. The next position is a tensor (what the
    model reads: a replayed CUDA graph advances it) and a count n (what eager code slices to)."""

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        self.l = [{} for _ in range(n_layers)]
        self.pos, self.n = torch.zeros(1, dtype=torch.long, device=device), 0
        self.pad, self.padded = torch.zeros(batch_size, dtype=torch.long, device=device), False  # left padding
        self.static = False  # set after the prefill by fast.py: read whole buffers, the unwritten part masked
        self.input_pos = self.end = None  # the positions the current forward writes, and reads up to

    def start(self, pad: Optional[torch.Tensor], n: int):
        """A prefill of n rows (beam search: one per request), left-padded by pad [n] (None: none)."""
        self.n, self.padded, self.static, self.l = 0, pad is not None, False, [{} for _ in self.l]
        self.pos.zero_()
        self.pad.zero_()
        if pad is not None:
            self.pad[:n] = pad

    def prepare(self, B: int, T: int, pad: Optional[torch.Tensor], prefill: bool):
        """Before a forward of T tokens in each of B rows -> (the positions they are written at [T], the position
        attention reads up to (None: the whole buffer), each row's left padding [B] (None: none))."""
        if prefill:
            self.start(pad, B)
        self.input_pos = self.pos + torch.arange(T, device=self.pos.device)
        self.end = None if self.static else self.n + T
        return self.input_pos, self.end, self.pad[:B] if self.static or self.padded else None

    def advance(self, T: int):
        self.pos += T
        if not self.static:  # a static step is counted by its caller: a replayed graph runs no Python
            self.n += T

    def update(self, layer: int, k, v):
        """Write k, v [n, n_kv_heads, T, head_dim] of the first n rows at this forward's positions -> the keys and
        values up to position `end` (None: the whole buffer, every shape fixed)."""
        ck, cv = self.k[layer], self.v[layer]
        if k.shape[0] < ck.shape[0]:  # beam search's prefill: one row per request
            ck, cv = ck[:k.shape[0]], cv[:k.shape[0]]
        ck.index_copy_(2, self.input_pos, k)
        cv.index_copy_(2, self.input_pos, v)
        return (ck, cv) if self.end is None else (ck[:, :, :self.end], cv[:, :, :self.end])

    def reorder(self, src):
        """Row i takes row src[i]'s contents (beam search: after the prefill, each request's row is copied to its
        beams). Eagerly the cache simply takes the reordered copies; in the static mode they are copied back in place,
        because a captured step goes on reading the same memory."""
        def move(t, dim=0):
            rows = t.index_select(dim, src)
            return t.copy_(rows) if self.static else rows
        self.k, self.v, self.pad = move(self.k, 1), move(self.v, 1), move(self.pad)
        self.l = [{site: move(t) for site, t in l.items()} for l in self.l]
