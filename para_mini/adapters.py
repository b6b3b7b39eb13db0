# Adapters: their settings, attaching one to a model for fine-tuning, and their files.
#
# A model carries at most one adapter: PARA's vector generator in every block (Block.vg), or a LoRA, (IA)^3 or
# BitFit wrapper around each projection it targets, as PEFT attaches them. A file holds one adapter's tensors under
# layers.{i}.<method>.<name>, e.g. layers.0.vg.down.weight or layers.0.lora.A.q. Serving many adapters at once is
# serving.py's.
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .loading import model_names
from .model import BitFitLinear, Block, IA3Linear, LoRALinear, ModelArgs, Transformer, VectorGenerator

# The seven projections an adapter can touch. q, k, v, g, u are the paper's Query, Key, Value, Gate and Up;
# o and d are the attention output and FFN Down projections (LoRA and BitFit may use them).
SITES = ("q", "k", "v", "o", "g", "u", "d")
LINEARS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "g": "feed_forward.w1", "u": "feed_forward.w3", "d": "feed_forward.w2"}  # each site's module in a Block
DEFAULT_TARGETS = {"para": ("q", "v", "u"), "ia3": ("k", "v", "u"), "lora": SITES, "bitfit": SITES}


@dataclasses.dataclass
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


# each method's file prefix, and its tensors: (name in the file, attribute path in the wrapper), one row per kind
PREFIX = {"para": "vg", "ia3": "ia3", "lora": "lora", "bitfit": "bitfit"}
KINDS = {"lora": [("A", "A"), ("B", "B")], "ia3": [("vectors", "l.vector")], "bitfit": [("vectors", "b.vector")],
         "ia3-proj": [("z", "l.z"), ("proj", "l.proj")], "bitfit-proj": [("z", "b.z"), ("proj", "b.proj")]}


def base_shape(args: ModelArgs) -> dict:
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size}


def weights_digest(model: Transformer, whole=lambda t: t) -> str:
    """The base model by shape and a sample of its values (every norm, a few embedding rows), rounded to bf16 so
    that fp32 and bf16 loads agree: the same weights under another path or in another format have the same digest.
    whole: gathers a sharded tensor (train.py under --shard, where every rank must call this)."""
    h = hashlib.sha256(json.dumps(base_shape(model.args), sort_keys=True).encode())
    for name in model_names(model.args):
        if "norm" in name or name == "tok_embeddings.weight":
            t = whole(model.get_parameter(name)).detach()
            t = torch.cat([t[:8], t[-8:]]) if t.dim() == 2 else t
            h.update(t.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def wrap(linear: nn.Linear, cfg: AdapterConfig) -> nn.Linear:
    """The projection `linear` with the baseline's adapter around it (its weight shared, not copied)."""
    if cfg.method == "lora":
        return LoRALinear(linear, cfg.r, cfg.alpha)
    return (IA3Linear if cfg.method == "ia3" else BitFitLinear)(linear, cfg.proj)


def unwrap(wrapper: nn.Linear) -> nn.Linear:
    plain = nn.Linear(wrapper.in_features, wrapper.out_features, bias=False, device="meta")
    plain.weight = wrapper.weight
    return plain


def new_adapter(args: ModelArgs, cfg: AdapterConfig, block) -> dict:
    """One block's fresh adapter: {"vg": VectorGenerator} for PARA, else {site: its projection wrapped}."""
    if cfg.method == "para":
        return {"vg": VectorGenerator(args, cfg)}
    # random draws in the order earlier versions made them, so that a seed gives the same adapter: LoRA's A by the
    # sites' names, (IA)^3's and BitFit's projections in the order of the targets
    order = sorted(cfg.targets) if cfg.method == "lora" else cfg.targets
    return {site: wrap(block.get_submodule(LINEARS[site]), cfg) for site in order}


def attach(block, modules: dict):
    """Put one block's adapter modules in place (new_adapter's dict); unwrapped linears restore the base."""
    for site, m in modules.items():
        parent, name = ("", "vg") if site == "vg" else LINEARS[site].split(".")
        setattr(block.get_submodule(parent) if parent else block, name, m)


def add_adapter(model: Transformer, config: AdapterConfig):
    """Attach a freshly initialised adapter; only its parameters require gradients. Returns the model."""
    if model.adapter is not None:
        raise ValueError(f"a {model.adapter.method} adapter is already attached: a model carries one "
                         "(remove_adapter first, or serve several with serving.Tenants)")
    device = model.output.weight.device
    for block in model.layers:
        attach(block, {k: m.to(device) for k, m in new_adapter(model.args, config, block).items()})
    model.adapter = dataclasses.replace(config)  # its own copy: changing the caller's must not change it
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_state(model).values():
        p.requires_grad_(True)
    return model


def remove_adapter(model: Transformer):
    cfg = model.adapter
    if cfg is None:
        raise ValueError("no adapter is attached")
    for block in model.layers:
        attach(block, {"vg": None} if cfg.method == "para" else
               {site: unwrap(block.get_submodule(LINEARS[site])) for site in cfg.targets})
    model.adapter = None


def kinds(cfg: AdapterConfig) -> list:
    return KINDS[cfg.method + ("-proj" if cfg.proj else "")]


def block_state(modules: dict, cfg: AdapterConfig) -> dict:
    """One block's adapter tensors (modules as new_adapter makes them) under their file names without the layer
    (e.g. lora.A.q), kind by kind, sites by name: the order of AdamW's state and of a checkpoint."""
    if cfg.method == "para":
        return {f"vg.{k}": p for k, p in modules["vg"].named_parameters()}
    return {f"{PREFIX[cfg.method]}.{kind}.{site}": modules[site].get_parameter(attr)
            for kind, attr in kinds(cfg) for site in sorted(cfg.targets)}


def block_modules(block, cfg: AdapterConfig) -> dict:
    """The adapter modules attached to a block, as new_adapter made them."""
    return {"vg": block.vg} if cfg.method == "para" else {s: block.get_submodule(LINEARS[s]) for s in cfg.targets}


def adapter_state(model: Transformer) -> dict:
    """The attached adapter's tensors under their file names, e.g. layers.0.vg.down.weight -> [r, dim]."""
    if model.adapter is None:
        raise ValueError("no adapter is attached")
    return {f"layers.{i}.{k}": p for i, block in enumerate(model.layers)
            for k, p in block_state(block_modules(block, model.adapter), model.adapter).items()}


def save_adapter(model: Transformer, path, tensors: dict = None, digest: str = None, format: str = "para-mini"):
    """Write the attached adapter to a .safetensors file, atomically (a crash never leaves a half-written file).
    tensors, digest: its adapter_state already gathered whole and the base's weights_digest, where the model is
    sharded across processes (train.py). format="peft": a LoRA or (IA)^3 adapter as a PEFT directory at `path`
    instead (peft_format.py)."""
    cfg = model.adapter
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in (tensors or adapter_state(model)).items()}
    if format == "peft":
        from .peft_format import write_peft  # it imports this module
        return write_peft(path, cfg, tensors)
    if format != "para-mini":
        raise ValueError(f"unknown adapter format {format!r}: para-mini or peft")
    write_adapter(path, cfg, base_shape(model.args) | {"digest": digest or weights_digest(model)}, tensors)


def write_adapter(path, cfg: AdapterConfig, base: dict, tensors: dict):
    base = dict(base)
    metadata = {"format": "para-mini", "method": cfg.method, "config": json.dumps(dataclasses.asdict(cfg)),
                "base_digest": base.pop("digest"), "base": json.dumps(base)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # written through open(), not safetensors' save_file, which makes the file 0600 whatever the umask
    tmp.write_bytes(save(tensors, metadata=metadata))
    os.replace(tmp, path)


def read_adapter(path):
    """(AdapterConfig, base, tensors) of an adapter file, with the file checked for what we need. base: the base
    model's shape, and its weights_digest under "digest" (files written before it was recorded have none); a
    directory is read as PEFT's LoRA or (IA)^3 adapter (base None: PEFT does not record it)."""
    path = Path(path)
    if path.is_dir():
        from .peft_format import read_peft  # it imports this module
        cfg, tensors = read_peft(path)
        return cfg, None, tensors
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable .safetensors adapter file: {e}") from None
    if meta.get("format") != "para-mini" or "config" not in meta or "base" not in meta:
        raise ValueError(f"{path} is not a para-mini adapter (metadata format={meta.get('format')!r}); "
                         "adapters are written by para_mini.save_adapter / train.py")
    cfg = json.loads(meta["config"])
    unknown = set(cfg) - {f.name for f in dataclasses.fields(AdapterConfig)}
    if unknown:
        raise ValueError(f"{path} has settings this version of para-mini does not know: {sorted(unknown)}")
    cfg["targets"] = tuple(cfg["targets"])
    base = json.loads(meta["base"]) | ({"digest": meta["base_digest"]} if "base_digest" in meta else {})
    return AdapterConfig(**cfg), base, tensors


def check_adapter(model: Transformer, path, cfg: AdapterConfig, base: dict, tensors: dict, other_base=False):
    """Refuse an adapter made for another base shape, or whose tensors do not match its own settings; and one made
    on other weights of the same shape too, unless other_base."""
    args, base = model.args, None if base is None else dict(base)  # None: a PEFT directory, which records no base
    digest = None if base is None else base.pop("digest", None)
    if base is not None and base != base_shape(args):
        raise ValueError(f"adapter {path} was trained for a base model of shape {base}, but the loaded model is "
                         f"{base_shape(args)}: load the base model the adapter was trained on")
    want = expected_shapes(args, cfg)
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {want[k]})"
             for k in want if k in tensors and tuple(tensors[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter {path} does not match its settings {cfg} on a model of shape "
                         f"{base_shape(args)}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape {wrong[:5]}")
    if digest is not None and not other_base and digest != weights_digest(model):
        raise ValueError(f"adapter {path} was trained on other base weights of the same shape (digest {digest}, "
                         f"the loaded model's {weights_digest(model)}): load the base model it was trained on, or "
                         "accept it anyway (other_base=True; generate.py --allow-other-base)")


def load_adapter(model: Transformer, path, other_base: bool = False) -> Transformer:
    """Attach the adapter stored at `path` to `model` (which must carry none). Returns the model. A file made for
    another shape is refused; one made on other weights of the same shape too, unless other_base=True."""
    cfg, base, tensors = read_adapter(path)
    check_adapter(model, path, cfg, base, tensors, other_base)
    add_adapter(model, cfg)
    with torch.no_grad():
        for k, p in adapter_state(model).items():
            p.copy_(tensors[k])
    return model


def merge_lora(model: Transformer):
    """Fold the attached LoRA adapter into the backbone (W += alpha / r * B A), for serving at base speed."""
    cfg = model.adapter
    if cfg is None or cfg.method != "lora":
        raise ValueError(f"only LoRA adapters can be merged; the model carries {cfg.method if cfg else 'none'}")
    if len(getattr(model, "tenants", ())):
        raise ValueError("merging changes the backbone every adapter served from it shares (serving.Tenants): "
                         "merge only on a model that serves no other adapter")
    with torch.no_grad():
        for block in model.layers:
            for site in cfg.targets:
                lora = block.get_submodule(LINEARS[site])
                lora.weight += (lora.scaling * lora.B @ lora.A).to(lora.weight.dtype)
    remove_adapter(model)


def one_block_adapter(args: ModelArgs, cfg: AdapterConfig) -> dict:
    """One block's adapter tensors by file name (without the layer), made on the meta device: shapes, no memory."""
    with torch.device("meta"):
        block = Block(args)
        return block_state(new_adapter(args, cfg, block), cfg)


def expected_shapes(args: ModelArgs, cfg: AdapterConfig) -> dict:
    one = one_block_adapter(args, cfg)
    return {f"layers.{i}.{k}": tuple(p.shape) for i in range(args.n_layers) for k, p in one.items()}


def count_parameters(args: ModelArgs, config: AdapterConfig) -> int:
    """Tunable parameters of one adapter on a model of shape `args` (built on the meta device: no memory)."""
    return args.n_layers * sum(p.numel() for p in one_block_adapter(args, config).values())
