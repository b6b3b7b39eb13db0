# python -m para_mini.params: the tunable parameter count of each PEFT method on a LLaMA-2 shape.
import argparse

from .adapters import count_parameters
from .adapters import AdapterConfig
from .model import ModelArgs

PRESETS = {  # Meta's params.json of each release
    "7b": ModelArgs(),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "stories260K": ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172,
                             max_seq_len=512),
}


def main():
    p = argparse.ArgumentParser(description="Print the tunable parameter count of each PEFT method on a LLaMA-2 "
                                "shape (PARA settings default to the paper's: r=12, K=4, targets q,v,u).")
    p.add_argument("--base", choices=sorted(PRESETS), default="7b", help="model shape (default: 7b)")
    p.add_argument("--para-r", type=int, default=12, help="PARA bottleneck r (default 12)")
    p.add_argument("--para-K", type=int, default=4, help="PARA capsules K (default 4)")
    p.add_argument("--para-targets", default="q,v,u", help="PARA targets among q,k,v,g,u (default q,v,u)")
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lora-targets", default="q,k,v,o,g,u,d", help="LoRA targets (default: all seven linears)")
    p.add_argument("--ia3-targets", default="k,v,u", help="(IA)^3 targets (default k,v,u as in the original)")
    p.add_argument("--bitfit-targets", default="q,k,v,o,g,u,d", help="BitFit targets (default: all seven)")
    p.add_argument("--ia3-proj", type=int, default=0, help="(IA)^3 through a projection of this size (paper 4.1)")
    p.add_argument("--bitfit-proj", type=int, default=0, help="BitFit through a projection of this size")
    a = p.parse_args()
    split = lambda s: tuple(s.split(","))
    rows = [("PARA / PARADE", AdapterConfig("para", split(a.para_targets), r=a.para_r, K=a.para_K)),
            ("(IA)^3", AdapterConfig("ia3", split(a.ia3_targets), proj=a.ia3_proj)),
            ("LoRA", AdapterConfig("lora", split(a.lora_targets), r=a.lora_r)),
            ("BitFit", AdapterConfig("bitfit", split(a.bitfit_targets), proj=a.bitfit_proj))]
    args = PRESETS[a.base]
    print(f"| method ({a.base}) | settings | tunable parameters |\n|---|---|---|")
    for label, cfg in rows:
        settings = f"targets {','.join(cfg.targets)}" + (f", r={cfg.r}" if cfg.method in ("para", "lora") else "") \
            + (f", K={cfg.K}, pooler {cfg.pooler}" if cfg.method == "para" else "") \
            + (f", proj={cfg.proj}" if cfg.proj else "")
        print(f"| {label} | {settings} | {count_parameters(args, cfg):,} |")


if __name__ == "__main__":
    main()
