#!/usr/bin/env bash
# bench/gpu.sh: one command that runs every GPU benchmark within a time budget (600 s for the whole command, on one
# H100 or one H200), each step under its own cap, so that one step that hangs or fails cannot take the others' time
# or their results. From the repo root:
#
#     COMMIT=<hash> bash bench/gpu.sh    # on the GPU machine; $OUT (default ./gpu-out) receives the files below;
#                                        # COMMIT names the code measured where .git is not at hand
#     GPU_SH_CPU=1 bash bench/gpu.sh     # rehearsal on a CPU: the same steps on the tiny shape, in bf16
#
# The steps run in priority order, each under its own `timeout`; a failed step does not stop the rest. Everything
# is logged to $OUT/log.txt; the end prints each step's exit code and seconds, and the key figures. Files under
# $OUT (7): log.txt, env.json, gpu_7b.json, train_8x512.json, train_4x2048.json, profile_7b.json, gpu_7b_compile.json
# (+ a .json.tmp of a step stopped in the middle of rewriting its JSON). Every step's JSON is rewritten as it goes
# ("complete": false until the end): a step stopped at its cap keeps what it measured, and every JSON carries the
# versions (torch, CUDA, cuDNN, transformers, peft).
#
# Time caps, from estimates. The figures are Hugging Face's, measured on one H100 with a 7B shape, eager (base
# batch 1 28.9 tokens/s, beam 3 25.3; LoRA 12.9 / 12.4; (IA)^3 19.4 / 19.6; base batch 8 207 for the whole batch;
# PEFT batch 8 mixing 4 LoRA adapters 22.8; LoRA training 6,098 tokens/s at 8 x 512, 5,909 at 4 x 2048). An H200
# has the same compute and more memory bandwidth, so its steps take no longer. A process start (imports, CUDA, a
# random 7B model) is taken as ~10 s.
#   (a) env           cap  60 s   est. 20-30 s warm, more on a cold machine (the first imports of torch and
#                     transformers read GBs from disk): versions, the GPU, the compile check, then one layer of the
#                     7B shape decoding (eager, fast, Hugging Face; batch 1 and 2 x 32 tokens) and one training
#                     forward, to list SDPA's backend for each shape; the versions are in env.json within seconds
#   (b) test_fast     cap  35 s   est. 15-25 s  (12 tests, 6 on CUDA, tiny model, a CUDA graph each)
#   (c) bench         cap 275 s   est. ~250 s:
#       decode.py times each row as 1 warm-up + 3 timed calls of 1 token (ttft) and as many of 32 tokens: 8 calls.
#       HF rows, 32 / tokens-per-s per 32-token call, x 4, plus 4 prefills:
#         base b1 4 x 1.11 s = 4.4 s, beam 3 4 x 1.26 = 5.1, batch 8 4 x 256/207 = 5.0, (IA)^3 4 x 1.65 = 6.6
#         and 4 x 1.63 = 6.5, LoRA 4 x 2.48 = 9.9 and 4 x 2.58 = 10.3: ~48 s, ~50 s with the prefills; PEFT with
#         its adapters in bf16 too (autocast_adapter_dtype=False), (IA)^3 and LoRA at batch 1, beam 1: ~17 s;
#         PEFT batch 8 mixing 8 adapters (decode.py mixes 8, the reference 4): 22.8 tokens/s with 4 is 350 ms a
#         step against base's 39 ms, ~78 ms per adapter, so ~39 + 8 x 78 = 660 ms a step, ~21 s a call: 4 calls
#         = ~85 s. With --max-timed-s 30 that row times 1 call after its warm-up (30 // 21 = 1): ~45 s.
#         HF in all: ~112 s (~150 s without --max-timed-s).
#       para-mini rows (not measured yet; taken as no slower than HF base's ~35 ms a step eager, 50 ms for LoRA,
#         ~8 ms a step from the CUDA graph): eager 4 methods x 3 settings x 8 calls x 32 steps = ~75 s, fast
#         ~30 s, with the graph captures: ~110 s. Start, HF twin, PEFT adapters, floor: ~15 s; freeing and
#         collecting between the ~50 rows: ~10 s. In all ~250 s.
#       If it overruns its cap, the rows measured so far are in gpu_7b.json; HF's slowest (the mixed batch) come last.
#   (d) train 8x512   cap  50 s   est. ~30 s: 4096 / 6098 = 0.67 s a step, 4 steps (1 warm-up + 3) x 3 rows
#                                             (para-mini, peft, peft-full-head), start and PEFT's set-up
#   (e) train 4x2048  cap  50 s   est. ~35 s: 8192 / 5909 = 1.39 s a step, x 12
#   (f) profile       cap  60 s   est. ~35 s: 8 cases x (3 warm-up + 10 timed + 1 profiled call) of <= 60 ms,
#                                             ~2 s a profiled case (CUPTI's start: more the first time)
#   total of the caps: 530 s (+5 s grace for each step killed at its cap); the whole command's limit is 600 s.
#   (g) compile       cap: what is left of $DEADLINE = 560 s (~160 s by the estimates above; skipped under 60 s,
#                     or where torch.compile lacks a C compiler or Python.h): the 5-s kill grace and the summary
#                     (<= 20 s) still end the script inside 600 s. Its two compiled rows (base, then PARA: the
#                     PARA vectors' layout is a second guard, so a second compilation of the unrolled 32-layer
#                     step) are taken as <= 120 s each with their timing, not measured yet: the log says how many
#                     fit, and the rows come as they are measured.
set -u  # no -e: a failed step is logged and the next one runs

cd "$(dirname "$0")/.."
export OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # on the GPU machine python3 is the one with PyTorch (`python` may not exist)
export PYTHONUNBUFFERED=1  # lines reach the log as they are printed, also from a step killed at its cap
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!

if [ "${GPU_SH_CPU:-0}" = 1 ]; then  # rehearsal: the tiny shape on the CPU, in the GPU's dtype (bf16)
    # one thread a process: where other work shares the cores, a second thread's waits at every operator's barrier
    # make the tiny model's steps up to ~100x slower (the rehearsal checks that the steps run, not their speed)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE=cpu
    SHAPE=(--shape tiny --device cpu)
    ENV=("${SHAPE[@]}" --dtype bf16)
    BENCH=("${SHAPE[@]}" --quick --dtype bf16)
    TRAIN=("${SHAPE[@]}" --steps 1)  # train_step.py runs bf16 by default
    PROFILE=("${SHAPE[@]}" --dtype bf16)
else  # the 7B shape in bf16 is each module's default on CUDA
    DEVICE=cuda
    ENV=() BENCH=() TRAIN=() PROFILE=()
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

# each module prints its JSON and writes it to --out too: stdout is dropped to keep the log short
echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown (pass COMMIT=...)')}"
step env 60 bash -c 'command -v nvidia-smi >/dev/null && nvidia-smi -L
    exec "$0" bench/env.py "$@" --out "$OUT/env.json" >/dev/null' "$PY" "${ENV[@]}"
step test_fast 35 "$PY" -m pytest -q tests/test_fast.py
step bench 275 bash -c 'exec "$0" bench/decode.py "$@" --max-timed-s 30 --out "$OUT/gpu_7b.json" >/dev/null' \
    "$PY" "${BENCH[@]}"
step train_8x512 50 bash -c 'exec "$0" bench/train_step.py "$@" --grad-checkpointing \
    --out "$OUT/train_8x512.json" >/dev/null' "$PY" "${TRAIN[@]}"
step train_4x2048 50 bash -c 'exec "$0" bench/train_step.py "$@" --grad-checkpointing --batch 4 --seq 2048 \
    --out "$OUT/train_4x2048.json" >/dev/null' "$PY" "${TRAIN[@]}"
# TEARDOWN_CUPTI=0: CUPTI stays up from one profiled case to the next (profile_decode.py sets it too, run alone)
step profile 60 env TEARDOWN_CUPTI=0 bash -c 'exec "$0" bench/profile_decode.py "$@" \
    --out "$OUT/profile_7b.json" >/dev/null' "$PY" "${PROFILE[@]}"
# (g) whatever time is left, up to DEADLINE (560 s) from the start: the fast path torch.compile'd before its CUDA
# graph (its small kernels fused), for base and PARA at batch 1, beam 1 only (one compilation each), eager beside them
# and the GEMV floor: goals 2, 3 and 5 of a compiled step. The rows are written as they come, so a step stopped at
# its cap keeps the ones it measured.
DEADLINE=${GPU_SH_DEADLINE:-560}  # lower it when less than ~10 minutes are left for the whole command
MISSING=$(timeout 60 "$PY" -c 'import sys, torch
sys.path.insert(0, "bench")
from decode import compile_missing
print(compile_missing(torch.device(sys.argv[1])) or "")' "$DEVICE" 2>&1 | tail -1)
LEFT=$((DEADLINE - SECONDS))
FIT=$(( (LEFT - 30) / 120 ))  # ~30 s: the start, the eager rows, the floor; then <= 120 s a compiled row (estimate)
FIT=$(( FIT > 2 ? 2 : FIT ))
if [ -n "$MISSING" ]; then
    echo "=== step compile skipped: torch.compile cannot build its kernels here, missing $MISSING"
    SUMMARY+=("compile        skipped: missing $MISSING")
elif [ $LEFT -ge 60 ]; then
    echo "=== compile: $LEFT s left of $DEADLINE; 2 compiled rows to run (base, then PARA), each one compilation of" \
        "the whole step, taken as <= 120 s with its timing (not measured yet): $FIT of the 2 fit by that estimate"
    step compile $LEFT bash -c 'exec "$0" bench/decode.py "$@" --compile --no-hf --methods base,para --beams 1 \
        --mixed none --out "$OUT/gpu_7b_compile.json" >/dev/null' "$PY" "${BENCH[@]}"
else
    echo "=== step compile skipped: $LEFT s left of $DEADLINE, under the 60 s it needs at the least"
    SUMMARY+=("compile        skipped: $LEFT s left of $DEADLINE")
fi

echo "=== summary (seconds since the start: $SECONDS)"
printf '%s\n' "${SUMMARY[@]}"
# the figures to read first, from whichever files were written
timeout 20 "$PY" - "$OUT" <<'EOF'
import json, os, sys
def load(name):
    path = os.path.join(sys.argv[1], name)
    return json.load(open(path)) if os.path.exists(path) else None
def num(x, fmt):
    return "-" if x is None else format(x, fmt)
e = load("env.json")
if e:
    print(f"env: {e['device']['name']}, {e['versions']}, torch.compile "
          f"{'ready' if e['compile']['ready'] else 'missing ' + str(e['compile']['missing'])}")
    for a in e.get("attention") or []:
        print(f"  attention {a['impl']:9s} {a['path']:5s} {a['phase']:7s} batch {a['batch']} {a['mask']:14s}: "
              f"{a['backend']} (cuDNN allowed: {a['backend_with_cudnn']})")
for name in ("gpu_7b.json", "gpu_7b_compile.json"):
    b = load(name)
    if b:
        r = b.get("roofline") or {}
        print(f"{name}: {b['shape']} {b['dtype']} on {b['device']}, {len(b['results'])} rows, complete "
              f"{b['complete']}, floor {num(b['floor_tokens_per_s'], '.1f')}, HBM roofline "
              f"{num(r.get('hbm_roofline_tokens_per_s'), '.1f')} tokens/s")
        for t in b["targets"]:
            print(f"  goal {t['target']}: {num(t['ratio'], '.3f'):>7s} ({t['goal']}, met {t['met']}) {t['what']}")
        for row in b["results"]:
            print(f"  {row['impl']:9s} {row['path']:5s} {row['method']:5s} batch {row['batch']} beam {row['beam']} "
                  f"{row['adapter_compute_dtype'] or '':8s}: {row['tokens_per_s']:8.1f} tokens/s, peak "
                  f"{num(row['peak_mem_mib'], '.0f')} MiB allocated, "
                  f"{num(row['peak_mem_reserved_mib'], '.0f')} reserved")
for name in ("train_8x512.json", "train_4x2048.json"):
    t = load(name)
    for r in (t or {}).get("results", []):
        print(f"{name}: {r['impl']:14s} {r['tokens_per_s']:9.0f} tokens/s, peak {r['peak_mem_gib']:.1f} GiB "
              f"({num(r['peak_mem_reserved_gib'], '.1f')} reserved), mfu {num(r['mfu'], '.3f')}")
p = load("profile_7b.json")
for case, c in (p or {}).get("cases", {}).items():
    print(f"profile {case:18s} wall {c['wall_ms']:8.2f} ms, kernels {num(c['kernel_ms'], '8.2f')} ms in "
          f"{c['kernels']}")
EOF
exec >&- 2>&-  # close the log's pipe and wait for tee to write its last lines before the files are taken back
wait $TEE
