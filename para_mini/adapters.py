# Adapters as files: create one, attach it, save it, load it (DESIGN.md, "Adapter files").
#
# Adapters with the same settings share one "bank" in every layer, an nn.ModuleList with one module per tenant, so
# a batch can mix tenants (serving.py). A file holds one tenant: its module's tensors, under
# layers.{i}.<prefix>.<parameter>.
import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .loading import model_names
from .model import LINEARS, METHODS, AdapterConfig, ModelArgs, Transformer

PREFIX = {"para": "vg", "ia3": "ia3", "lora": "lora", "bitfit": "bitfit"}  # file key: layers.{i}.vg.down.weight


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


def add_adapter(model: Transformer, config: AdapterConfig, name: str = "default") -> str:
    """Attach a freshly initialised adapter as tenant `name`; only adapter parameters require gradients."""
    if name in model.tenants:
        raise ValueError(f"an adapter named {name!r} is already attached")
    config = dataclasses.replace(config)  # the bank keeps its own copy: changing the caller's must not change it
    device = model.output.weight.device
    banks = model.layers[0].adapters
    bank = next((b for b, m in banks.items() if m.config == config), None)
    if bank is None:
        bank = next(f"{config.method}{i}" for i in itertools.count() if f"{config.method}{i}" not in banks)
        for layer in model.layers:
            layer.adapters[bank] = nn.ModuleList()
            layer.adapters[bank].config = config
    for layer in model.layers:  # one freshly initialised tenant per layer, in the bank's dtype
        tenants = layer.adapters[bank]
        fresh = METHODS[config.method](model.args, config).to(device)
        tenants.append(fresh.to(next(tenants[0].parameters()).dtype) if len(tenants) else fresh)
    model.tenants[name] = (bank, len(banks[bank]) - 1)
    for n, p in model.named_parameters():
        p.requires_grad_(".adapters." in n)
    return name


def adapter_config(model: Transformer, name: str) -> AdapterConfig:
    bank, _ = model.tenants[name]
    return model.layers[0].adapters[bank].config


def adapter_state(model: Transformer, name: str) -> dict:
    """The tenant's tensors under their file names, e.g. layers.0.vg.down.weight -> [r, dim]."""
    bank, slot = model.tenants[name]
    prefix = PREFIX[adapter_config(model, name).method]
    return {f"layers.{i}.{prefix}.{k}": p
            for i, layer in enumerate(model.layers) for k, p in layer.adapters[bank][slot].named_parameters()}


def save_adapter(model: Transformer, path, name: str = None, tensors: dict = None, digest: str = None):
    """Write one adapter to a .safetensors file, atomically (a crash never leaves a half-written file).
    tensors, digest: its adapter_state already gathered whole and the base's weights_digest, where the model is
    sharded across processes (train.py)."""
    name = name or _only_tenant(model)
    cfg = adapter_config(model, name)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in (tensors or adapter_state(model, name)).items()}
    metadata = {"format": "para-mini", "method": cfg.method, "config": json.dumps(dataclasses.asdict(cfg)),
                "base": json.dumps(base_shape(model.args)), "base_digest": digest or weights_digest(model)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # written through open(), not safetensors' save_file, which makes the file 0600 whatever the umask
    tmp.write_bytes(save(tensors, metadata=metadata))
    os.replace(tmp, path)


def read_adapter(path):
    """(AdapterConfig, base, tensors) of an adapter file, with the file checked for what we need. base: the base
    model's shape, and its weights_digest under "digest" (files written before it was recorded have none)."""
    path = Path(path)
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


def load_adapter(model: Transformer, path, name: str = None, other_base: bool = False) -> str:
    """Attach the adapter stored at `path` to `model` as tenant `name` (default: the file's stem). A file made for
    another shape is refused; one made on other weights of the same shape too, unless other_base=True."""
    cfg, base, tensors = read_adapter(path)
    digest = base.pop("digest", None)
    if base != base_shape(model.args):
        raise ValueError(f"adapter {path} was trained for a base model of shape {base}, but the loaded model is "
                         f"{base_shape(model.args)}: load the base model the adapter was trained on")
    if digest is not None and not other_base and digest != weights_digest(model):
        raise ValueError(f"adapter {path} was trained on other base weights of the same shape (digest {digest}, "
                         f"the loaded model's {weights_digest(model)}): load the base model it was trained on, or "
                         "accept it anyway (other_base=True; generate.py --allow-other-base)")
    name = add_adapter(model, cfg, name or Path(path).stem)
    want = adapter_state(model, name)
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(want[k].shape)})"
             for k in want if k in tensors and tensors[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        remove_adapter(model, name)
        raise ValueError(f"adapter {path} does not match its own settings {cfg}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    with torch.no_grad():
        for k, p in want.items():
            p.copy_(tensors[k])
    return name


def remove_adapter(model: Transformer, name: str):
    bank, slot = model.tenants.pop(name)
    if not any(b == bank for b, _ in model.tenants.values()):
        for layer in model.layers:
            del layer.adapters[bank]
        return
    for layer in model.layers:
        del layer.adapters[bank][slot]
    model.tenants = {n: (b, s - (b == bank and s > slot)) for n, (b, s) in model.tenants.items()}


def merge_lora(model: Transformer, name: str = None):
    """Fold a LoRA adapter into the backbone (W += alpha / r * B A) for single-tenant serving at base speed."""
    name = name or _only_tenant(model)
    cfg = adapter_config(model, name)
    if cfg.method != "lora":
        raise ValueError(f"only LoRA adapters can be merged; {name!r} is {cfg.method}")
    if len(model.tenants) > 1:
        raise ValueError(f"merging {name!r} changes the backbone every attached adapter shares "
                         f"({', '.join(model.tenants)}): merge only when it is the one adapter attached")
    bank, slot = model.tenants[name]
    with torch.no_grad():
        for layer in model.layers:
            lora = layer.adapters[bank][slot]
            for site in lora.A:
                W = layer.get_submodule(LINEARS[site]).weight
                W += (lora.scaling * lora.B[site] @ lora.A[site]).to(W.dtype)
    remove_adapter(model, name)


def _only_tenant(model):
    if len(model.tenants) != 1:
        raise ValueError(f"{len(model.tenants)} adapters are attached ({', '.join(model.tenants) or 'none'}): "
                         "name the one you mean")
    return next(iter(model.tenants))


def count_parameters(args: ModelArgs, config: AdapterConfig) -> int:
    """Tunable parameters of one adapter on a model of shape `args` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return args.n_layers * sum(p.numel() for p in METHODS[config.method](args, config).parameters())
