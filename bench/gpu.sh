#!/usr/bin/env bash
# bench/gpu.sh: everything issue 14 asks of a GPU, as ONE command, for a session that has 15 minutes of device time
# in all (the machine's start, 1-2 minutes, included; one command at most 600 s; at most 8 files come back from
# $OUT). From the repo root:
#
#     COMMIT=<hash> bash bench/gpu.sh    # on the GPU machine, with $OUT set (default ./gpu-out); the device tool's
#                                        # run with timeout_s=600 (.git may not travel: COMMIT names what ran)
#     GPU_SH_CPU=1 bash bench/gpu.sh     # rehearsal on a CPU: the same steps on the tiny shape, in bf16
#
# The steps run in priority order, each under its own `timeout` so that one that hangs or runs long cannot eat the
# time of the others, and a failed step does not stop the rest. Everything is logged to $OUT/log.txt; the end
# prints each step's exit code and seconds, and the key figures. Files under $OUT (6, at most 8):
#     log.txt, gpu_7b.json, train_8x512.json, train_4x2048.json, profile_7b.json, gpu_7b_compile.json
#     (+ a .json.tmp of a step stopped in the middle of rewriting its JSON; every module writes through bench.write)
# bench.py rewrites gpu_7b.json after every row ("complete": false until the end), so a bench stopped at its cap
# still leaves every row it measured.
#
# Time caps, from estimates (H200 = H100-class figures from ../shared/DESIGN.md "Reference figures", measured with
# Hugging Face eager on a 7B shape: base batch 1 28.9 tokens/s, beam 3 25.3; LoRA 12.9 / 12.4; (IA)^3 19.4 / 19.6;
# base batch 8 207 (whole batch); PEFT batch 8 mixing 4 LoRA adapters 22.8; training 6,098 tokens/s at 8 x 512,
# 5,909 at 4 x 2048). A process start (imports, CUDA, a random 7B model) is taken as ~10 s.
#   (a) env           cap  20 s   est.   5-10 s
#   (b) test_fast     cap  60 s   est.  15-25 s  (12 tests, 6 on CUDA, tiny model, a CUDA graph each)
#   (c) bench         cap 270 s   est. ~220 s:
#       bench.py times each row as 1 warm-up + 3 timed calls of 1 token (ttft) and as many of 32 tokens: 8 calls.
#       HF rows, 32 / tokens-per-s per 32-token call, x 4, plus 4 prefills:
#         base b1 4 x 1.11 s = 4.4 s, beam 3 4 x 1.26 = 5.1, batch 8 4 x 256/207 = 5.0, (IA)^3 4 x 1.65 = 6.6
#         and 4 x 1.63 = 6.5, LoRA 4 x 2.48 = 9.9 and 4 x 2.58 = 10.3: ~48 s, ~50 s with the prefills;
#         PEFT batch 8 mixing 8 adapters (bench.py mixes 8, the reference 4): 22.8 tokens/s with 4 is 350 ms a
#         step against base's 39 ms, ~78 ms per adapter, so ~39 + 8 x 78 = 660 ms a step, ~21 s a call: 4 calls
#         = ~85 s. With --max-timed-s 30 that row times 1 call after its warm-up (30 // 21 = 1): ~45 s.
#         HF in all: ~95 s (~135 s without --max-timed-s).
#       para-mini rows (not measured yet; taken as no slower than HF base's ~35 ms a step eager, 50 ms for LoRA,
#         ~8 ms a step from the CUDA graph): eager 4 methods x 3 settings x 8 calls x 32 steps = ~75 s, fast
#         ~30 s, with the graph captures: ~110 s. Start, HF twin, PEFT adapters, floor: ~15 s. In all ~220 s.
#       If it overruns its cap, the rows measured so far are in gpu_7b.json; HF's slowest (the mixed batch) come last.
#   (d) train 8x512   cap  60 s   est. ~25 s: 4096 / 6098 = 0.67 s a step, 4 steps (1 warm-up + 3) x 2 impls
#   (e) train 4x2048  cap  60 s   est. ~30 s: 8192 / 5909 = 1.39 s a step, x 8
#   (f) profile       cap  60 s   est. ~35 s: 8 cases x (3 warm-up + 10 timed + 1 profiled call) of <= 60 ms,
#                                             ~2 s a profiler session (CUPTI's start: more the first time)
#   total of the caps: 530 s (+5 s grace for each step killed at its cap); the run command's limit is 600 s.
#   (g) compile       cap: what is left of $DEADLINE = 560 s (~190 s by the estimates above; skipped under 60 s):
#                     the 5-s kill grace and the summary (<= 20 s) still end the script inside the 600-s limit.
#                     The time to compile the 7B step (twice) is not known; the rows come as they are measured.
set -u  # no -e: a failed step is logged and the next one runs

cd "$(dirname "$0")/.."
export OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # on the GPU machine python3 is the one with PyTorch (`python` may not exist)
export PYTHONUNBUFFERED=1  # lines reach the log as they are printed, also from a step killed at its cap
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!

if [ "${GPU_SH_CPU:-0}" = 1 ]; then  # rehearsal: the tiny shape on the CPU, in the GPU's dtype (bf16)
    SHAPE=(--shape tiny --device cpu)
    BENCH=("${SHAPE[@]}" --quick --dtype bf16)
    TRAIN=("${SHAPE[@]}" --steps 1)  # bench_train runs bf16 by default
    PROFILE=("${SHAPE[@]}" --dtype bf16)
else  # the 7B shape in bf16 is each module's default on CUDA
    BENCH=() TRAIN=() PROFILE=()
fi

SUMMARY=()
step() {  # step NAME CAP_SECONDS COMMAND...: run it under its cap, note its exit code and seconds
    local name=$1 cap=$2 t0=$SECONDS rc cmd
    shift 2
    cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo "=== $(date -u +%H:%M:%S) step $name (cap ${cap} s): ${cmd:0:240}"
    timeout -k 5 "$cap" "$@"
    rc=$?
    [ $rc = 124 ] || [ $rc = 137 ] && echo "=== step $name stopped at its cap of $cap s"
    SUMMARY+=("$(printf '%-14s exit %3d  %4d s  (cap %d s)' "$name" $rc $((SECONDS - t0)) "$cap")")
}

VERSIONS='
import platform, torch
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "torch", torch.__version__, "cuda", cuda,
      torch.cuda.get_device_name() if cuda else "", "threads", torch.get_num_threads())
for name in ("transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as e:
        print(name, "missing:", e)
'
# each module prints its JSON and writes it to --out too: stdout is dropped to keep the log short
echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown (pass COMMIT=...)')}"
step env 20 bash -c 'nvidia-smi -L; exec "$0" -c "$1"' "$PY" "$VERSIONS"
step test_fast 60 "$PY" -m pytest -q tests/test_fast.py
step bench 270 bash -c 'exec "$0" -m para_mini.bench "$@" --max-timed-s 30 --out "$OUT/gpu_7b.json" >/dev/null' \
    "$PY" "${BENCH[@]}"
step train_8x512 60 bash -c 'exec "$0" -m para_mini.bench_train "$@" --grad-checkpointing \
    --out "$OUT/train_8x512.json" >/dev/null' "$PY" "${TRAIN[@]}"
step train_4x2048 60 bash -c 'exec "$0" -m para_mini.bench_train "$@" --grad-checkpointing --batch 4 --seq 2048 \
    --out "$OUT/train_4x2048.json" >/dev/null' "$PY" "${TRAIN[@]}"
step profile 60 bash -c 'exec "$0" -m para_mini.bench_profile "$@" --out "$OUT/profile_7b.json" >/dev/null' \
    "$PY" "${PROFILE[@]}"
# (g) whatever time is left, up to DEADLINE (560 s) from the start: the fast path torch.compile'd before its CUDA
# graph (its small kernels fused), for base and PARA at batch 1, beam 1 only (one compilation each), eager beside them
# and the GEMV floor: targets 2, 3 and 5 of a compiled step. The rows are written as they come, so a step stopped at
# its cap keeps the ones it measured.
DEADLINE=${GPU_SH_DEADLINE:-560}  # lower it when the session has less than ~10 minutes of device time left
LEFT=$((DEADLINE - SECONDS))
if [ $LEFT -ge 60 ]; then
    step compile $LEFT bash -c 'exec "$0" -m para_mini.bench "$@" --compile --no-hf --methods base,para --beams 1 \
        --mixed none --out "$OUT/gpu_7b_compile.json" >/dev/null' "$PY" "${BENCH[@]}"
else
    SUMMARY+=("compile        skipped: $LEFT s left of $DEADLINE")
fi

echo "=== summary (seconds since the start: $SECONDS)"
printf '%s\n' "${SUMMARY[@]}"
# the figures a session reads first, from whichever files were written
timeout 20 "$PY" - "$OUT" <<'EOF'
import json, os, sys
def load(name):
    path = os.path.join(sys.argv[1], name)
    return json.load(open(path)) if os.path.exists(path) else None
for name in ("gpu_7b.json", "gpu_7b_compile.json"):
    b = load(name)
    if b:
        print(f"{name}: {b['shape']} {b['dtype']} on {b['device']}, {len(b['results'])} rows, complete "
              f"{b['complete']}, floor {b['floor_tokens_per_s']}")
        for t in b["targets"]:
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
            print(f"  target {t['target']}: {ratio:>7s} (goal {t['goal']}, met {t['met']}) {t['what']}")
for name in ("train_8x512.json", "train_4x2048.json"):
    t = load(name)
    for r in (t or {}).get("results", []):
        print(f"{name}: {r['impl']:9s} {r['tokens_per_s']:9.0f} tokens/s, peak {r['peak_mem_gib']:.1f} GiB, "
              f"mfu {r['mfu']}")
p = load("profile_7b.json")
for case, c in (p or {}).get("cases", {}).items():
    print(f"profile {case:18s} wall {c['wall_ms']:8.2f} ms, kernels {c['kernel_ms']:8.2f} ms in {c['kernels']}")
EOF
exec >&- 2>&-  # close the log's pipe and wait for tee to write its last lines before the files are taken back
wait $TEE
