# Serving many adapters ("tenants") from one backbone, each row of a batch with its own.
#
# model.py carries one adapter at most and computes on plain tensors. Here every tenant is kept as its own adapter
# modules (adapters.new_adapter: a vector generator per block, or wrappers around the model's shared projections),
# and a batch installs into the model, for as long as it runs:
#   - where every row uses the same tenant, its vector generator as it is, and for its projections the terms its
#     wrappers would compute at every token (A, alpha / r B, l, b), computed once per batch: the fine-tuned model's
#     arithmetic exactly;
#   - where rows differ, "row" versions of the modules, holding each row's own tenant's tensors stacked [B, ...]:
#     RowVectors runs each PARA setting's vector generator with every row's own weights (torch.func.functional_call)
#     and RowLinear adds each row's LoRA / BitFit term and (IA)^3 scale; rows of other adapters get the identity
#     (a vector of ones, a zero term), so every row computes what it computes alone.
# The model sees projections and a vector generator that return plain tensors; it never learns what a tenant is.
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from .adapters import LINEARS, SITES, AdapterConfig, attach, block_state, check_adapter, new_adapter, read_adapter


class RowLinear(nn.Linear):
    """A projection whose rows each carry their own tenant's terms: y = s * (W x + sum of x A^T B^T + b), where A, B
    (alpha / r folded in), s and b are [B, ...], one per row (B = 0, s = 1, b = 0 on rows without that adapter), or
    shared by every row where all use one adapter."""

    def __init__(self, base: nn.Linear, lora: list, shift, scale):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight, self.lora, self.shift, self.scale = base.weight, lora, shift, scale

    def forward(self, x):
        y = super().forward(x)
        for A, B in self.lora:  # one (A, B) per LoRA setting in the batch
            y = y + (x @ A.mT) @ B.mT
        y = y if self.shift is None else y + self.shift
        return y if self.scale is None else self.scale * y

    def tensors(self) -> list:
        return [t for pair in self.lora for t in pair] + [t for t in (self.shift, self.scale) if t is not None]


class RowVectors(nn.Module):
    """In place of Block.vg: every row's l_q, l_v, l_u from its own tenant's vector generator (ones elsewhere)."""

    def __init__(self, groups: list):
        super().__init__()
        self.groups = groups  # per PARA setting: (a vector generator of it, its parameters stacked per row, rows)

    def forward(self, h, mask):
        out = {}
        for vg, params, rows in self.groups:
            for site, l in functional_call(vg, params, (h, mask)).items():
                l = l.masked_fill(~rows[:, None, None], 1.0)  # rows of other adapters: the identity
                out[site] = out[site] * l if site in out else l
        return out

    def tensors(self) -> list:
        return [t for _, params, rows in self.groups for t in [*params.values(), rows]]


class Tenants:
    """Adapters by name for one base model (which carries none of its own), used by the rows that name them."""

    def __init__(self, model):
        if model.adapter is not None:
            raise ValueError("tenants share a bare base model: this one carries an adapter of its own")
        self.model, self.adapters, self.kept = model, {}, {}  # kept: a mixed batch's row modules, by its rows' settings
        self.active = False  # a batch's adapters are installed in the model
        model.tenants = self  # so that adapters.merge_lora refuses to change the backbone they share
        self.base = [{site: block.get_submodule(LINEARS[site]) for site in SITES} for block in model.layers]

    def add(self, name: str, cfg: AdapterConfig, tensors: dict = None) -> str:
        """A tenant with the adapter's tensors by file name (None: freshly initialised)."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if self.active:  # its wrappers must wrap the model's own projections, not a batch's
            raise ValueError("add adapters between batches, not inside tenants.rows()")
        device = self.model.output.weight.device
        self.adapters[name] = (cfg, [{k: m.to(device) for k, m in new_adapter(self.model.args, cfg, b).items()}
                                     for b in self.model.layers])
        with torch.no_grad():
            for k, p in self.state(name).items():
                p.requires_grad_(False)
                if tensors is not None:
                    p.copy_(tensors[k])
        return name

    def load(self, path, name: str = None, other_base: bool = False) -> str:
        """Read an adapter file (checked against the model, as adapters.load_adapter does) as tenant `name` (default:
        the file's stem)."""
        cfg, base, tensors = read_adapter(path)
        check_adapter(self.model, path, cfg, base, tensors, other_base)
        return self.add(name or Path(path).stem, cfg, tensors)

    def remove(self, name: str):
        del self.adapters[name]
        self.kept.clear()  # row modules holding its tensors

    def state(self, name: str) -> dict:
        """The tenant's tensors under their file names (as adapters.adapter_state gives a model's)."""
        cfg, modules = self.adapters[name]
        return {f"layers.{i}.{k}": p for i, m in enumerate(modules) for k, p in block_state(m, cfg).items()}

    def __contains__(self, name):
        return name in self.adapters

    def __iter__(self):
        return iter(self.adapters)

    def __len__(self):
        return len(self.adapters)

    @contextmanager
    def rows(self, names: list):
        """The model's forward passes inside run each row b with the adapter names[b] (None: the base model)."""
        unknown = sorted({n for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.adapters) or 'none'}")
        if self.model.adapter is not None:
            raise ValueError("tenants share a bare base model: an adapter was attached to it since")
        installed = None if set(names) == {None} else self.installed(names)
        try:
            self.active = True
            for block, modules in zip(self.model.layers, installed or ()):
                attach(block, modules)
            yield
        finally:
            self.active = False
            for block, base in zip(self.model.layers, self.base):
                attach(block, {"vg": None, **base})

    def installed(self, names: list) -> list:
        """Each block's modules for a batch whose rows use these adapters. Their structure depends only on which
        adapter settings the batch holds (or on the one adapter every row uses); those of an earlier batch with the
        same are refilled in place, so that a captured decoding step reads the new rows' tensors where it reads them."""
        if len(set(names)) == 1:
            key, fresh = json.dumps(["one", names[0]]), [self.one(i, names[0]) for i in range(len(self.model.layers))]
        else:
            settings = [None if n is None else self.adapters[n][0] for n in names]
            key = json.dumps([len(names), sorted({json.dumps(asdict(s)) for s in settings if s is not None})])
            fresh = [self.block_rows(i, names, settings) for i in range(len(self.model.layers))]
        if key in self.kept:
            with torch.no_grad():
                for mine, new in zip(self.kept[key], fresh):
                    for k in mine:
                        for t, u in zip(getattr(mine[k], "tensors", list)(), getattr(new[k], "tensors", list)()):
                            t.copy_(u)
            return self.kept[key]
        self.kept[key] = fresh
        return fresh

    def one(self, i: int, name: str) -> dict:
        """Block i's modules for a batch whose every row uses adapter `name`: its own vector generator, and for its
        projections the very terms its wrappers compute at every token (A, alpha / r B, l or b, in the activations'
        dtype), computed once for the batch."""
        cfg, modules = self.adapters[name]
        dtype, m = self.model.output.weight.dtype, modules[i]
        if cfg.method == "para":
            return {"vg": m["vg"]}
        out = {}
        for site in cfg.targets:
            w, base = m[site], self.base[i][site]
            if cfg.method == "lora":
                out[site] = RowLinear(base, [(w.A.to(dtype), w.B.to(dtype) * w.scaling)], None, None)
            elif cfg.method == "ia3":
                out[site] = RowLinear(base, [], None, w.l().to(dtype))
            else:
                out[site] = RowLinear(base, [], w.b().to(dtype), None)
        return out

    def block_rows(self, i: int, names: list, settings: list) -> dict:
        """Block i's RowVectors and RowLinears for these rows."""
        device, dtype = self.model.output.weight.device, self.model.output.weight.dtype
        modules = lambda n: self.adapters[n][1][i]
        groups = {}  # each adapter setting -> the rows that use it
        for b, s in enumerate(settings):
            if s is not None:
                groups.setdefault(json.dumps(asdict(s)), (s, []))[1].append(b)
        out, vgs, lora, shift, scale = {}, [], {}, {}, {}
        for _, (s, rows) in sorted(groups.items()):  # in a fixed order, whatever the rows' order
            in_group = torch.zeros(len(names), dtype=torch.bool, device=device)
            in_group[rows] = True
            first = names[rows[0]]
            pick = [names[b] if b in rows else first for b in range(len(names))]  # other rows: ignored, any tenant
            if s.method == "para":
                vg = modules(first)["vg"]
                params = {k: torch.stack([dict(modules(n)["vg"].named_parameters())[k] for n in pick])
                          for k, _ in vg.named_parameters()}
                vgs.append((vg, params, in_group))
                continue
            for site in s.targets:
                per_row = [modules(n)[site] for n in pick]
                keep = in_group.view(-1, 1, 1)
                if s.method == "lora":
                    A = torch.stack([m.A.to(dtype) for m in per_row])
                    B = torch.stack([m.B.to(dtype) * m.scaling for m in per_row]).masked_fill(~keep, 0.0)
                    lora.setdefault(site, []).append((A, B))
                else:
                    vector = lambda m: (m.l() if s.method == "ia3" else m.b()).to(dtype).reshape(1, -1)
                    t = torch.stack([vector(m) for m in per_row])  # [B, 1, d_out]
                    if s.method == "ia3":
                        t = t.masked_fill(~keep, 1.0)
                        scale[site] = scale[site] * t if site in scale else t
                    else:
                        t = t.masked_fill(~keep, 0.0)
                        shift[site] = shift[site] + t if site in shift else t
        if vgs:
            out["vg"] = RowVectors(vgs)
        for site in sorted(set(lora) | set(shift) | set(scale)):
            out[site] = RowLinear(self.base[i][site], lora.get(site, []), shift.get(site), scale.get(site))
        return out
