# python bench/profile_decode.py: where the time of one decoding step and of one prefill goes, kernel by kernel,
# for the base model and PARA on decode.py's random model, so that a goal that decode.py reports as missed comes
# with its explanation: which kernels, how many, how long, and how much of the wall time no kernel
# covers (launch overhead and Python, what a CUDA graph removes).
#
# Cases, each run alone after a warm-up: the prefill of one 274-token prompt (goal 5: PARA's time to first token
# over base's), one eager decoding step at batch 1 (goals 1 and 3), and one step of the fast path (fast.py):
# replayed from its CUDA graph ("fast_graph") and, since a graph replay may show as one launch, its one_token()
# run un-captured ("fast_kernels"), which lists the kernels the graph holds. On a GPU the profiler records CUDA
# activity and a "kernel" is a device event (kernels, copies, memsets); on a CPU it records operators, a "kernel"
# is an operator that calls no other, and times are CPU times. Every case's wall time is measured first and
# written; then each case's profile, the JSON rewritten after each, so a run stopped early keeps what it measured.
import argparse
import os
import statistics
import sys
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# decode.py, the decoding benchmark beside this script, also puts this checkout's para_mini first on the path
from decode import (DTYPES, METHODS, SHAPES, attach, device_name, emit, prompts, random_model, same_attention,
                    seconds, shape_and_dtype, sync, versions, write)
from para_mini.fast import Step, one_token
from para_mini.generation import Request, prefill, serve
from para_mini.serving import Tenants


def kernels(fn, device, top):
    """Profile one call of fn -> (kernel time in ms, number of kernels, the `top` kernels by time with counts)."""
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
        fn()
        sync(device)
    if on_gpu:  # device events: their own duration
        events = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:  # operators that call no other operator: where a CPU does the work ("[memory]": allocations, if listed)
        events = [(e.name, e.self_cpu_time_total) for e in prof.events()
                  if e.device_type == DeviceType.CPU and not e.cpu_children and e.name != "[memory]"]
    by_name = defaultdict(lambda: [0, 0.0])
    for name, us in events:
        by_name[name][0] += 1
        by_name[name][1] += us
    total = sum(us for _, us in events)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return total / 1e3, len(events), [{"name": name[:160], "count": n, "ms": us / 1e3, "share": us / total}
                                      for name, (n, us) in ranked]


def cases(model, tenants, prompt, method, adapter, new_tokens):
    """The name -> function of each case for one method; every call of a function does the same work (the same
    cache position), so warm-up, timed and profiled calls are alike. Decoding reads the vectors made at the prefill,
    so only the prefill needs the adapter installed (tenants.rows)."""
    request, max_len = Request(prompt, adapter, new_tokens), len(prompt) + new_tokens
    step = Step(model, 1, -(-max_len // 16) * 16, compile=False)  # its own cache: the eager one stays as it is
    with serve(tenants, [adapter]):
        cache = model.new_cache(1, max_len)
        token = prefill(model, [request], cache).argmax(-1)
        prefill(model, [request], step.reuse())
        step.load()
    n = cache.n

    def eager():
        cache.n = n  # decode the same position again: keys and values are rewritten, shapes stay the same
        cache.pos.fill_(n)
        model(token[:, None], cache=cache)

    def fast_graph():
        step.cache.pos.fill_(n)
        step(token)  # on a GPU: captured at the first call (a warm-up), replayed after

    def fast_kernels():
        step.cache.pos.fill_(n)
        one_token(model, step.cache, step.tokens)

    def prefill_once():
        with serve(tenants, [adapter]):
            prefill(model, [request], model.new_cache(1, max_len))

    return {f"prefill_{method}": prefill_once, f"eager_{method}": eager, f"fast_graph_{method}": fast_graph,
            f"fast_kernels_{method}": fast_kernels}, step


def main(argv=None):
    p = argparse.ArgumentParser(description="Profile one prefill and one decoding step (eager; fast, replayed and "
                                "un-captured) of the base model and PARA; prints JSON (and writes it to --out).")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 7b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-len", type=int, default=274, help="prompt tokens (274, the paper's Table 4)")
    p.add_argument("--rounds", type=int, default=10, help="timed calls of each case, in rounds over all (10)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per case, by time (15)")
    p.add_argument("--out", help="also write the JSON here, after the timings and again after each case's profile")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    shape, dtype = shape_and_dtype(a, device)
    # CUPTI's teardown after a profiled case, then its start again, can hang or crash once CUDA graphs were captured
    # by hand; torch sets this in-process, before its profiler starts, only for the graphs of torch.compile
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    same_attention()
    model = random_model(SHAPES[shape], dtype, device)
    tenants = Tenants(model)
    [adapter] = attach(tenants, METHODS["para"], 1)
    [prompt] = prompts(model.args.vocab_size, a.prompt_len, 1)
    fns, graphs = {}, {}
    for method, name in (("base", None), ("para", adapter)):
        made, decoder = cases(model, tenants, prompt, method, name, 32)
        fns |= made
        graphs[method] = decoder
    for fn in fns.values():  # warm-up: the first calls (allocator, kernels' first use, the CUDA graphs' capture)
        for _ in range(3):
            fn()
    # timed in rounds over every case, so that a change of the machine's load in the meantime touches them alike
    times = {case: [] for case in fns}
    for _ in range(a.rounds):
        for case, fn in fns.items():
            times[case].append(seconds(fn, device))
    out = {case: {"wall_ms": statistics.median(times[case]) * 1e3, "kernel_ms": None, "not_kernel_ms": None,
                  "kernels": None, "top": None,
                  "cuda_graph": case.startswith("fast_graph") and graphs[case.split("_")[-1]].graph is not None}
           for case in fns}
    report = {
        "shape": shape, "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "prompt_len": a.prompt_len,
        "para": str(METHODS["para"]), "batch": 1,
        "definitions": {
            "wall_ms": "median wall time of one call without the profiler (GPU synchronised before and after), over "
                       "rounds that time every case once each",
            "kernel_ms": "CUDA: the summed durations of the profiled call's device events (kernels, copies, memsets);"
                         " CPU: the summed self time of the operators that call no other (null until that case's "
                         "profile is done)",
            "not_kernel_ms": "wall_ms - kernel_ms: time no kernel covers (launches, Python, synchronisation)",
            "kernels": "how many such events (CUDA) or operators (CPU) the profiled call ran",
            "top": "the kernels with the most time, grouped by name: count, ms, share of kernel_ms",
            "cases": "prefill: one 274-token prompt (the first token included); eager: one decoding step of "
                     "model.py; fast_graph: one step of the fast path, replayed from its CUDA graph on a GPU (a "
                     "replay may show as few events); fast_kernels: the same step run un-captured",
            "ratios": "PARA over base for each case, once both are profiled",
            "profiler": "one profiler run per case, after every case's wall time is measured; CUPTI is not torn "
                        "down between cases (TEARDOWN_CUPTI=0, torch's own workaround for CUDA graphs), and the "
                        "JSON is rewritten after each case, so a run stopped early keeps what it measured",
            "complete": "false until every case is profiled",
        },
        "cases": out, "ratios": {}, "complete": False, "versions": versions(),
    }
    if a.out:
        write(report, a.out)
    for case, fn in fns.items():
        kernel_ms, n, top = kernels(fn, device, a.top)
        ms = out[case]["wall_ms"]
        out[case] |= {"kernel_ms": kernel_ms, "not_kernel_ms": ms - kernel_ms, "kernels": n, "top": top}
        print(f"{case:18s} wall {ms:8.2f} ms, kernels {kernel_ms:8.2f} ms in {n} launches", file=sys.stderr)
        report["ratios"] = {kind: {key: out[f"{kind}_para"][key] / out[f"{kind}_base"][key]
                                   for key in ("wall_ms", "kernel_ms", "kernels")}
                            for kind in ("prefill", "eager", "fast_graph", "fast_kernels")
                            if out[f"{kind}_para"]["kernels"] and out[f"{kind}_base"]["kernels"]}
        if a.out:
            write(report, a.out)
    report["complete"] = True
    return emit(report, a.out)


if __name__ == "__main__":
    main()
