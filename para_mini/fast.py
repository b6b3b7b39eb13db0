# The fast decode path, opt-in (generate(..., fast=True), generate.py --fast): the eager path's decoding step with
# every shape fixed, so that a GPU replays it from a CUDA graph (or torch.compile compiles it) instead of Python
# launching each of its hundreds of small kernels one by one. The eager path (model.py) stays the reference.
#
# The eager step slices the KV cache up to the current position, so its shapes grow by one at every token. Here the
# cache is written at a position held in a tensor (index_copy_), attention reads the whole buffer with a mask made
# from that position and each row's left padding, and the rows never change: beam search moves them in place, and
# greedy decoding keeps computing finished rows rather than drop them. The prompt is prefilled by the eager path;
# its keys, values and every layer's Vectors (PARA's l_q, l_v, l_u, the other tenants' vectors, LoRA factors and
# BitFit biases, the identity on rows without an adapter) are copied into static tensors that the step reads.
# The blocks are model.py's own (Block.forward), so the step computes the same equations.
import torch

from .model import Transformer, rope
from .serving import Cache, KVCache, Vectors


class StaticKV:
    """One layer's keys and values [B, n_kv_heads, max_len, head_dim], written at the position tensor and read
    whole (the mask hides what is not written yet), and the layer's Vectors: what Block.forward uses of a KVCache."""

    def __init__(self, like: KVCache, pos):
        self.k, self.v = torch.zeros_like(like.k), torch.zeros_like(like.v)
        self.pos, self.vectors = pos, None

    def update(self, start, k, v):  # start: the eager path's Python position; here the position is the tensor pos
        self.k.index_copy_(2, self.pos, k)
        self.v.index_copy_(2, self.pos, v)
        return self.k, self.v


def tensors(v: Vectors) -> list:
    """Every tensor one layer's Vectors holds, in a fixed order."""
    return [*v.l.values(), *v.b.values(), *(t for pairs in v.lora.values() for pair in pairs for t in pair)]


def static_copy(v: Vectors) -> Vectors:
    """Tensors of the step's own: reordered in place and refilled by load(), so never an adapter's own parameter
    (a LoRA factor shared by every row is the parameter itself)."""
    out = Vectors()
    out.l, out.b = ({site: t.clone() for site, t in d.items()} for d in (v.l, v.b))
    out.lora = {site: [(A.clone(), B.clone()) for A, B in pairs] for site, pairs in v.lora.items()}
    return out


def layout(v: Vectors) -> tuple:
    """What a captured step depends on in a layer's Vectors: which projections carry which tensors, of which shape."""
    lora = tuple((site, len(pairs)) for site, pairs in v.lora.items())
    return tuple(v.l), tuple(v.b), lora, tuple(t.shape for t in tensors(v))


class FastDecoder:
    """The static-shape decoding step for a batch of B rows and a cache of max_len positions."""

    def __init__(self, model: Transformer, cache: Cache, compile: bool):
        k = cache.layers[0].k
        self.model, self.compile, self.shape = model, compile, (k.shape[0], k.shape[2])  # (B, max_len)
        self.pos = torch.zeros(1, dtype=torch.long, device=k.device)  # where this step's token goes in the buffer
        self.pad = torch.zeros(k.shape[0], dtype=torch.long, device=k.device)  # each row's left padding
        self.tokens = torch.zeros(k.shape[0], 1, dtype=torch.long, device=k.device)  # this step's input
        self.keys = torch.arange(k.shape[2], device=k.device)
        self.layers = [StaticKV(c, self.pos) for c in cache.layers]
        # torch.compile's default mode adds no CUDA graphs of its own: on a GPU, capture() makes the one graph
        self.forward = torch.compile(self.one_token, dynamic=False) if compile else self.one_token
        self.layouts = self.graph = self.out = None

    def load(self, cache: Cache):
        """Copy in an eager prefill's cache: keys, values, left padding, position and every layer's Vectors."""
        vectors = [c.vectors for c in cache.layers]
        if [layout(v) for v in vectors] != self.layouts:  # other adapters in the batch: new tensors, a new graph
            self.layouts, self.graph = [layout(v) for v in vectors], None
            for s, v in zip(self.layers, vectors):
                s.vectors = static_copy(v)
        else:  # the same layout: the captured graph reads the new vectors from the same memory
            for s, v in zip(self.layers, vectors):
                for mine, new in zip(tensors(s.vectors), tensors(v)):
                    mine.copy_(new)
        for s, c in zip(self.layers, cache.layers):
            s.k.copy_(c.k)
            s.v.copy_(c.v)
        if cache.pad is None:  # no row is padded
            self.pad.zero_()
        else:
            self.pad.copy_(cache.pad)
        self.pos.fill_(cache.pos)

    def one_token(self):
        """Every row's next-token logits [B, 1, vocab] from self.tokens, with every shape fixed."""
        m, a = self.model, self.model.args
        positions = (self.pos - self.pad).clamp(min=0)[:, None]  # each row's position after its left padding [B, 1]
        cos, sin = rope(positions, a.head_dim, a.rope_theta)
        sees = (self.keys <= self.pos) & (self.keys >= self.pad[:, None])  # the positions each row sees [B, max_len]
        h = m.tok_embeddings(self.tokens)  # [B, 1, dim]
        # as an additive mask in the activations' dtype, made once: given the bool mask, attention would convert it
        # at every layer (a few more kernels each)
        mask = torch.zeros(sees.shape, dtype=h.dtype, device=h.device).masked_fill(~sees, float("-inf"))
        for layer, kv in zip(m.layers, self.layers):
            h = layer(h, cos, sin, mask[:, None, None], None, kv)  # model.py's block, prompt None: decoding
        return m.output(m.norm(h))

    def capture(self):
        # warm up (and compile) off the capturing stream, as CUDA graphs require; the warm-up writes the keys and
        # values of this very step, which the replay writes again
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.forward()  # the graph's output tensor: each replay refills it

    def step(self, rows, tokens):
        """Feed tokens [n] to the cache rows `rows` [n] -> their next-token logits [n, vocab] in fp32. The other rows
        (finished requests) are computed too, and ignored: that is what keeps every shape fixed."""
        self.tokens.index_copy_(0, rows, tokens[:, None])
        if self.pos.device.type == "cuda":
            if self.graph is None:
                self.capture()
            self.graph.replay()
        else:
            self.out = self.forward()
        self.pos += 1
        return self.out[rows, -1].float()

    def reorder(self, dst, src):
        """Rows dst take the contents of rows src (beam search), in place, so the step keeps reading the same memory.
        Vectors shared by every row (2-D, or one row) stay as they are."""
        for t in [self.pad] + [t for s in self.layers for t in (s.k, s.v, *tensors(s.vectors))
                               if t.dim() >= 3 and t.shape[0] > 1]:
            t.index_copy_(0, dst, t.index_select(0, src))


def fast_decoder(model: Transformer, cache: Cache, compile: bool = False) -> FastDecoder:
    """The model's FastDecoder for this cache's batch and length, loaded with the cache. It is kept on the model
    (model.fast_decoder, one at a time) so that the next batch of the same shape reuses its buffers and its CUDA
    graph rather than capture another; `model.fast_decoder = None` frees it."""
    d = getattr(model, "fast_decoder", None)
    k = cache.layers[0].k
    if d is None or d.shape != (k.shape[0], k.shape[2]) or d.compile != compile:
        model.fast_decoder = None  # let go of the old buffers before making the new ones
        d = model.fast_decoder = FastDecoder(model, cache, compile)
    d.load(cache)
    return d
