# python bench/env.py: what a GPU run's figures depend on, read before the benchmarks run: the versions
# (Python, torch, CUDA, cuDNN, transformers, peft), the GPU's name and datasheet figures, whether torch.compile can
# build its kernels on this machine, and the attention backend SDPA picks for each of our and Hugging Face's shapes
# (the prefill, every decoding step, a training forward). The benchmarks take cuDNN out of SDPA's choices for both
# sides (decode.same_attention); each shape's entry also says what torch would pick with cuDNN allowed, without
# running it. The JSON is written as each part is done (versions first), so a step stopped early keeps them.
import argparse
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

# decode.py, the decoding benchmark beside this script, also puts this checkout's para_mini first on the path
from decode import (DTYPES, SHAPES, compile_missing, device_name, emit, fresh, gpu_specs, hf_inputs, hf_missing,
                    hf_twin, prompts, random_model, same_attention, shape_and_dtype, versions, write)
from para_mini.generation import Request, generate


class SDPAChoices(TorchFunctionMode):
    """Notes, at every F.scaled_dot_product_attention call, the backend SDPA picks with this process's settings and
    the one it would pick with cuDNN allowed (asked of torch._fused_sdp_choice, which runs nothing)."""

    def __init__(self):
        super().__init__()
        self.case, self.seen = None, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            # a decoding step's queries are fewer than its keys (Hugging Face may fold query heads into its length)
            phase = "train" if q.requires_grad else "prefill" if q.shape[-2] == k.shape[-2] else "decode"
            kind = (f"{str(mask.dtype).removeprefix('torch.')} mask" if mask is not None else
                    "causal" if kwargs.get("is_causal") else "none")
            chosen = self.choice(args, kwargs, torch.backends.cuda.cudnn_sdp_enabled())
            with_cudnn = self.choice(args, kwargs, True)
            key = (*self.case, phase, q.shape[0], q.shape[-2] if phase == "decode" else None, kind, chosen,
                   with_cudnn)
            low, high, n = self.seen.get(key, (k.shape[-2], k.shape[-2], 0))
            self.seen[key] = (min(low, k.shape[-2]), max(high, k.shape[-2]), n + 1)
        return func(*args, **kwargs)

    @staticmethod
    def choice(args, kwargs, cudnn: bool) -> str:
        """The backend SDPA picks for these arguments with cuDNN allowed or not (the other settings as they are)."""
        was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        try:
            return SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name
        except Exception as e:  # a probe: say what went wrong, and let the run go on
            return f"unknown ({type(e).__name__}: {e})"
        finally:
            torch.backends.cuda.enable_cudnn_sdp(was)

    def table(self):
        return [{"impl": impl, "path": path, "phase": phase, "batch": B, "q_len": q_len, "mask": kind,
                 "backend": chosen, "backend_with_cudnn": with_cudnn, "kv_len": [low, high], "calls": n}
                for (impl, path, phase, B, q_len, kind, chosen, with_cudnn), (low, high, n) in self.seen.items()]


def attention_cases(model, prompt_len, new_tokens, train_len, with_hf):
    """Run our eager and fast decoding, Hugging Face's generate and a training forward of each under SDPAChoices:
    at batch 1 and at batch 2 with left padding, the benchmarks' prompt length and new tokens."""
    device, vocab = model.output.weight.device, model.args.vocab_size
    hf = hf_twin(model) if with_hf else None
    choices = SDPAChoices()
    with choices:
        for batch in (1, 2):
            ps = prompts(vocab, prompt_len, batch)
            for path in ("eager", "fast"):
                choices.case = ("para-mini", path)
                generate(model, [Request(p, None, new_tokens) for p in ps], fast=path == "fast")
            fresh(model, device)  # the fast decoder of this batch: a new one for the next
            if hf is not None:
                choices.case = ("hf", "eager")
                ids, mask = hf_inputs(ps, device)
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)
        tokens = torch.randint(3, vocab, (2, train_len), device=device)
        for impl, net in (("para-mini", model), ("hf", hf)):
            if net is None:
                continue
            choices.case = (impl, "train")
            emb = net.tok_embeddings if impl == "para-mini" else net.get_input_embeddings()
            emb.weight.requires_grad_(True)  # so that attention's inputs require gradients, as in training
            try:
                net(tokens) if impl == "para-mini" else net(input_ids=tokens)
            finally:
                emb.weight.requires_grad_(False)
    return choices.table()


def main(argv=None):
    p = argparse.ArgumentParser(description="Versions, GPU, compiler check and SDPA's attention backend for our and "
                                "Hugging Face's shapes; prints JSON (and writes it to --out).")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 7b on CUDA, tiny on CPU); one "
                   "layer of it is built, which has every attention shape of the whole model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-len", type=int, default=274, help="prompt tokens (274, as decode.py)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens (32, as decode.py)")
    p.add_argument("--train-len", type=int, default=512, help="tokens per sequence of the training forward (512)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face even when installed")
    p.add_argument("--out", help="also write the JSON here, after each part")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape, dtype = shape_and_dtype(a, device)
    missing_hf = None if a.no_hf else hf_missing()
    if missing_hf:
        print(f"Hugging Face skipped: {missing_hf}", file=sys.stderr)
    with_hf = not a.no_hf and not missing_hf
    same_attention()
    missing = compile_missing(device)
    report = {
        "device": gpu_specs(device_name(device)), "versions": versions(), "threads": torch.get_num_threads(),
        "compile": {"ready": missing is None, "missing": missing},
        "definitions": {
            "device": "the GPU's name read at run time; peak_bf16_flops and hbm_bytes_per_s from its datasheet "
                      "(null where decode.GPUS does not list it)",
            "compile": "whether torch.compile can build kernels here: Triton needs a C compiler and Python.h at its "
                       "first kernel (Inductor's CPU kernels a C++ compiler); missing: what is not found",
            "attention": "one entry per (impl, path, phase, batch, q_len, mask, backend): backend is what SDPA "
                         "runs in the benchmarks (cuDNN turned off for both sides), backend_with_cudnn what torch "
                         "would pick with cuDNN allowed (its default); kv_len: the smallest and largest key length "
                         "seen; calls: how many calls. Phases: prefill, decode (one new token per row), train "
                         "(inputs requiring gradients); q_len: a decoding step's query length (null at the prefill "
                         "and in training, where it is kv_len)",
        },
        "settings": {"shape": shape, "layers": 1, "dtype": str(dtype).removeprefix("torch."),
                     "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "train_len": a.train_len},
        "sdp_enabled": None, "attention": None, "complete": False,
    }
    print(f"{report['device']['name']}: {report['versions']}", file=sys.stderr)
    print(f"torch.compile: {'ready' if missing is None else 'cannot build kernels, missing ' + missing}",
          file=sys.stderr)
    if a.out:
        write(report, a.out)
    b = torch.backends.cuda
    report["sdp_enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                             "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    model = random_model(replace(SHAPES[shape], n_layers=1), dtype, device)
    report["attention"] = attention_cases(model, a.prompt_len, a.new_tokens, a.train_len, with_hf)
    for e in report["attention"]:
        print(f"attention {e['impl']:9s} {e['path']:5s} {e['phase']:7s} batch {e['batch']} q {e['q_len'] or '='} "
              f"kv {e['kv_len'][0]}-{e['kv_len'][1]} {e['mask']:14s}: {e['backend']} (cuDNN allowed: "
              f"{e['backend_with_cudnn']})",
              file=sys.stderr)
    report["complete"] = True
    return emit(report, a.out)


if __name__ == "__main__":
    main()
