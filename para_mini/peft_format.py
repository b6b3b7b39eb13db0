# LoRA and (IA)^3 adapters as Hugging Face PEFT stores them: a directory with adapter_config.json and
# adapter_model.safetensors, the tensors named after the model's modules, e.g.
#   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]    our layers.0.lora.A.q
#   base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]   our layers.0.lora.B.q
#   base_model.model.model.layers.0.self_attn.k_proj.ia3_l           [out, 1]   our layers.0.ia3.vectors.k
#   base_model.model.model.layers.0.mlp.down_proj.ia3_l              [1, ffn]   our layers.0.ia3.vectors.u
# Written and read here with json and safetensors alone: neither peft nor transformers is needed.
#
# The two compute the same: LoRA's update is scaled by lora_alpha / r in both (not rsLoRA), and PEFT's (IA)^3
# scales a projection's output, or with the projection in feedforward_modules its input. Our u (the Up
# projection's output) is therefore PEFT's down_proj in feedforward_modules, PEFT's own choice for LLaMA: the FFN
# intermediate silu(G) * U is scaled either way. PARA, BitFit and the projected (IA)^3 / BitFit have no PEFT form.
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .adapters import LINEARS, AdapterConfig
from .loading import HF_NAMES

MODULES = {site: HF_NAMES[path] for site, path in LINEARS.items()}  # q -> self_attn.q_proj, ..., d -> mlp.down_proj
SITE_OF = {module.split(".")[1]: site for site, module in MODULES.items()}  # q_proj -> q, ..., down_proj -> d
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                 r"(lora_A\.weight|lora_B\.weight|ia3_l)")

# adapter_config.json settings read here, or that do not change what a trained adapter computes (how it was
# initialised, where it came from); every other setting must be off (null, false, {}, [], "none"), or it is refused
KNOWN = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
           "auto_mapping", "target_modules", "feedforward_modules", "exclude_modules", "r", "lora_alpha",
           "lora_dropout", "init_lora_weights", "init_ia3_weights", "loftq_config", "eva_config", "corda_config",
           "lora_ga_config", "megatron_core", "qalora_group_size", "layers_pattern", "ensure_weight_tying"}


def peft_form_problem(cfg: AdapterConfig):
    """Why the adapter has no PEFT form, or None."""
    if cfg.method not in ("lora", "ia3"):
        return (f"a {cfg.method} adapter has no PEFT form: PEFT has LoRA and (IA)^3, and para-mini writes those; "
                "keep the para-mini .safetensors file")
    if cfg.proj:
        return (f"(IA)^3 through a projection (proj={cfg.proj}) has no PEFT form: PEFT's (IA)^3 learns each vector "
                "itself; keep the para-mini .safetensors file")
    if cfg.method == "ia3" and {"u", "d"} <= set(cfg.targets):
        return ("(IA)^3 on both u and d has no PEFT form: PEFT scales down_proj's input (our u, the FFN "
                "intermediate) or its output (our d), not both")
    return None


def write_peft(path, cfg: AdapterConfig, tensors: dict):
    """Write an adapter (our file names -> tensors, as adapters.adapter_state gives them) as a PEFT directory."""
    problem = peft_form_problem(cfg)
    if problem:
        raise ValueError(problem)
    # (IA)^3 on u: down_proj's input scaling, PEFT's feedforward module
    module = lambda site: "mlp.down_proj" if cfg.method == "ia3" and site == "u" else MODULES[site]
    out = {}
    for name, t in tensors.items():
        i, _, kind, site = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(\w+)\.(\w)", name).groups()
        key = f"base_model.model.model.layers.{i}.{module(site)}"
        if cfg.method == "lora":
            out[f"{key}.lora_{kind}.weight"] = t  # A [r, in], B [out, r]: PEFT's nn.Linear weights
        else:
            out[f"{key}.ia3_l"] = t[None] if site == "u" else t[:, None]  # input scaling [1, ffn], output [out, 1]
    config = {"peft_type": cfg.method.upper(), "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
              "revision": None, "inference_mode": True,
              "target_modules": sorted({module(site).split(".")[1] for site in cfg.targets}), "fan_in_fan_out": False,
              "modules_to_save": None}
    if cfg.method == "lora":
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        config |= {"r": cfg.r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                   "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None, "layers_pattern": None}
    else:
        config |= {"feedforward_modules": ["down_proj"] if "u" in cfg.targets else [], "init_ia3_weights": True}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in (("adapter_model.safetensors", save(out, metadata={"format": "pt"})),
                       ("adapter_config.json", json.dumps(config, indent=2, sort_keys=True).encode())):
        tmp = path / (name + ".tmp")
        tmp.write_bytes(data)  # through open(), not save_file, which makes the file 0600 whatever the umask
        os.replace(tmp, path / name)


def read_peft(path):
    """(AdapterConfig, our file names -> tensors) of a PEFT LoRA or (IA)^3 directory; settings that para-mini does
    not compute are refused by name."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is a directory without adapter_config.json: not a PEFT adapter")
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found" + (" (an adapter_model.bin is read only as safetensors: "
                                "re-save it with PEFT's save_pretrained)" if (path / "adapter_model.bin").exists()
                                else ""))
    config = json.loads(config_file.read_text())
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise ValueError(f"{path}: a PEFT {kind} adapter; para-mini reads PEFT's LoRA and (IA)^3 adapters")
    unsupported = {k: v for k, v in config.items() if k not in KNOWN and v not in (None, False, {}, [], "none")}
    if unsupported:
        raise ValueError(f"{path}: PEFT settings para-mini does not compute: {unsupported}")
    with safe_open(str(weights_file), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}

    feedforward = set(config.get("feedforward_modules") or [])
    tensors, sites = {}, {}  # sites: layer -> its adapted sites
    for key, t in stored.items():
        m = KEY.fullmatch(key)
        if m is None or m[3] not in SITE_OF:
            raise ValueError(f"{path}: {key} is not a LLaMA projection's LoRA or (IA)^3 tensor")
        i, module, what = int(m[1]), m[3], m[4]
        if what == "ia3_l" and module in feedforward:
            if module != "down_proj":
                raise ValueError(f"{path}: (IA)^3 scales the input of {module}; para-mini's (IA)^3 scales "
                                 "projection outputs, and only down_proj's input (the FFN intermediate, our u) is one")
            site, t = "u", t.reshape(-1)
        else:
            site = SITE_OF[module]
            t = t.reshape(-1) if what == "ia3_l" else t
        if what == "ia3_l":
            name = f"layers.{i}.ia3.vectors.{site}"
        else:
            name = f"layers.{i}.lora.{what[len('lora_')]}.{site}"  # lora_A.weight -> layers.{i}.lora.A.{site}
        if name in tensors:  # up_proj's output and down_proj's input scaling both: two vectors on one intermediate
            raise ValueError(f"{path}: two (IA)^3 vectors scale our {site} in layer {i}; para-mini keeps one")
        tensors[name] = t
        sites.setdefault(i, set()).add(site)
    targets = sites.get(0, set())
    if not tensors or sorted(sites) != list(range(len(sites))) or any(s != targets for s in sites.values()):
        raise ValueError(f"{path}: para-mini adapts the same projections in every layer; this adapter adapts "
                         f"{ {i: sorted(s) for i, s in sorted(sites.items())} }")
    if kind == "LORA":
        r = tensors[f"layers.0.lora.A.{min(targets)}"].shape[0]
        if r != config.get("r", 8):
            raise ValueError(f"{path}: lora_A has {r} rows but r is {config.get('r')}")
        cfg = AdapterConfig("lora", tuple(targets), r=r, alpha=float(config.get("lora_alpha", 8)))
    else:
        cfg = AdapterConfig("ia3", tuple(targets))
    return cfg, {k: t.to(torch.float32) for k, t in tensors.items()}
