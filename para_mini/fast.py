# The decoding step replayed from a CUDA graph (generate(..., fast=True), generate.py --fast): model.py's own forward
# for one new token per row, captured once, so that a GPU replays its hundreds of small kernels at once instead of
# Python launching each (torch.compile fuses them first with compile=True). Nothing is computed differently: the KV
# cache is put in its static mode, where every shape is fixed (the whole buffer is read, the attention mask hides what
# is not written yet) and the position is a tensor that the graph itself advances. On a CPU the same step runs as it is.
import torch

from .cache import KVCache
from .model import Transformer


def one_token(model: Transformer, cache: KVCache, tokens):
    return model(tokens, cache=cache)  # [B, 1] -> [B, 1, vocab]


class Step:
    """The decoding step of a cache of B rows and max_len positions, kept with its CUDA graph for the next batch of
    the same shape (as model.decode_step, one at a time; `model.decode_step = None` frees it)."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int, compile: bool):
        self.model, self.compile = model, compile
        self.cache = model.new_cache(batch_size, max_len)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.cache.pos.device)  # the step's input
        # a plain function, not a bound method: the step holds no reference to itself, and is freed with its last user
        self.forward = torch.compile(one_token, dynamic=False) if compile else one_token
        self.graph = self.out = self.inputs = None

    def reuse(self) -> KVCache:
        """The cache, ready for the next batch's prefill (which runs eagerly); call load() after it."""
        self.cache.static, self.cache.n = False, 0
        return self.cache

    def load(self):
        """After the prefill (and beam search's copy of each prompt to its beams): what a captured graph reads must
        be where it reads it. The vectors of the new prompts are copied into the captured ones; other adapters in the
        model, or vectors of other shapes, need a new graph."""
        cache, modules = self.cache, list(self.model.modules())
        shapes = [[(site, t.shape) for site, t in l.items()] for l in cache.l]
        if self.inputs is not None and self.inputs[1] == shapes and len(self.inputs[0]) == len(modules) \
                and all(a is b for a, b in zip(self.inputs[0], modules)):
            for mine, new in zip(self.inputs[2], cache.l):
                for site, t in mine.items():
                    t.copy_(new[site])
        else:
            self.graph, self.inputs = None, (modules, shapes, cache.l)
        cache.l, cache.static = self.inputs[2], True

    def __call__(self, tokens):
        """tokens [B] -> every row's next-token logits [B, vocab] in fp32."""
        self.tokens.copy_(tokens[:, None])
        if self.tokens.device.type == "cuda":
            if self.graph is None:
                self.capture()
            self.graph.replay()
        else:
            self.out = self.forward(self.model, self.cache, self.tokens)
        self.cache.n += 1
        return self.out[:, -1].float()

    def capture(self):
        # warm up (and compile) off the capturing stream, as CUDA graphs require; each warm-up call writes the keys and
        # values of this very step and advances the position, which is then put back for the replay
        pos = self.cache.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.forward(self.model, self.cache, self.tokens)
                self.cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.forward(self.model, self.cache, self.tokens)  # recorded, not run: each replay runs it


def decode_step(model: Transformer, batch_size: int, max_len: int, compile: bool = False) -> Step:
    """The model's kept Step if it has this shape, else a new one (the old one freed first)."""
    step = getattr(model, "decode_step", None)
    if step is None or step.cache.k.shape[1] != batch_size or step.cache.k.shape[3] != max_len \
            or step.compile != compile:
        model.decode_step = None  # let go of the old buffers and graph before making new ones
        step = model.decode_step = Step(model, batch_size, max_len, compile)
    return step
