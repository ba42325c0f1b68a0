#!/usr/bin/env bash
# One prepared GPU check (one H100/H200, no Ray / DeepSpeed / datasets, no network), ~8 min wall.
#
#   OUT=/some/empty/dir bash benchmarks/gpu_check.sh            # on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --smoke # same steps, tiny, on CPU
#
# Steps, each with its own timeout and log under $OUT (a failed step does not stop the others):
#   scale_gqa_swiglu, scale_mha_gelu  benchmarks/scale.py --params 6.25e9 on cuda: cascade seconds,
#                                     peak GPU memory, calibration MFU vs a measured bf16 matmul
#   validate_ckpt                     a small cascade checkpoint (scale.py --params 1e8) to validate
#   validate_fit, validate_oom        `cascade validate` (python -m runner.cli validate) measured on
#                                     cuda: a budget that fits (exit 0) and one below the weights,
#                                     which the probe turns into set_per_process_memory_fraction and
#                                     must end out of memory (exit 3, "oom": true)
#   inference                         benchmarks/inference.py --on cuda: dense vs pruned latency/peak
#   recovery_speed                    benchmarks/recovery_speed.py step on cuda: a LoRA step of a
#                                     SmolLM2-shaped model, fp32 / bf16 x whole / chunked LM head,
#                                     tokens/s and GFLOP/s against the measured matmul peak
# and $OUT/summary.json: every step's exit status and seconds, the key figures, the targets
# (cascade of 6.25e9 <= 15 min, peak <= 45 GiB, calibration MFU >= 40%; reported, not tuned for).
#
# --smoke (or GPU_CHECK_SMOKE=1): CPU, ~1e7 parameters, float32, and ray / datasets / deepspeed
# made unimportable (a directory on PYTHONPATH whose ray.py, datasets.py and deepspeed.py raise
# ImportError), so the plumbing of every entry point is checked in ~2 minutes without a GPU;
# there validate_ckpt is skipped (scale_gqa_swiglu's checkpoint is already small and is validated).
# Environment: PYTHON (default python3), OUT (default /tmp/gpu_check_<mode>), GPU_CHECK_TOTAL_S
# (the wall-clock budget the step timeouts share, default 480 on the GPU, 300 in smoke mode),
# GPU_CHECK_SCALE_VALIDATE (a device profile: scale.py also validates its 6.25e9 export; default
# none, to save ~40 s per architecture).
set -u

MODE=gpu
if [ "${1:-}" = "--smoke" ] || [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
    MODE=smoke
fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_$MODE}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if [ "$MODE" = smoke ]; then
    mkdir -p "$WORK/blocked"
    for module in ray datasets deepspeed; do
        echo 'raise ImportError("not on the device")' >"$WORK/blocked/$module.py"
    done
    export PYTHONPATH="$WORK/blocked:$PYTHONPATH"
    DEV=cpu
    PARAMS=1e7
    SCALE_EXTRA=(--smoke --dtype float32 --vocab 1000 --cal-samples 8 --seq-len 64 --cal-batch 4
        --recover-steps 1 --recover-batch 2)
    INFERENCE_EXTRA=(--repeats 1 --seq-len 32)
    RECOVERY_EXTRA=(--model tiny-shape --rounds 1 --matmul 256)
    RECOVERY_RESERVE=60
    TOTAL=${GPU_CHECK_TOTAL_S:-300}
    SCALE_CAP=90
else
    DEV=cuda
    PARAMS=6.25e9
    SMALL_PARAMS=1e8
    SCALE_EXTRA=()
    INFERENCE_EXTRA=()
    RECOVERY_EXTRA=(--model smollm2-shape --rounds 5 --batch 8 --length 512 --matmul 8192)
    RECOVERY_RESERVE=90
    TOTAL=${GPU_CHECK_TOTAL_S:-480}
    SCALE_CAP=200
fi
START=$(date +%s)
DEADLINE=$((START + TOTAL))
STEPS="$OUT/steps.tsv"
: >"$STEPS"
echo "gpu_check: mode $MODE, python $PY, out $OUT, budget ${TOTAL}s" | tee "$OUT/progress.log"

{
    echo "mode=$MODE"
    echo "date=$(date -u +%FT%TZ)"
    echo "git=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    timeout 30 "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0]);
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available());
print("transformers", transformers.__version__)' 2>&1
    if [ "$MODE" = gpu ]; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
            --format=csv 2>&1
    fi
} >"$OUT/env.txt"

# run_step NAME CAP RESERVE [--stdout FILE] CMD...: timeout = min(CAP, time left - RESERVE), where
# RESERVE is what the steps after this one need at least; a step with under 15 s left is skipped.
run_step() {
    local name=$1 cap=$2 reserve=$3 stdout=""
    shift 3
    if [ "${1:-}" = "--stdout" ]; then
        stdout=$2
        shift 2
    fi
    local left=$((DEADLINE - $(date +%s) - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped\t0\t0\n' "$name" >>"$STEPS"
        echo "== $name: skipped, no time left" | tee -a "$OUT/progress.log"
        return
    fi
    echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/progress.log"
    local t0 t1 rc
    t0=$(date +%s.%N)
    if [ -n "$stdout" ]; then
        timeout -k 15 "$limit" "$@" >"$stdout" 2>"$OUT/$name.log"
    else
        timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    fi
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >>"$STEPS"
    echo "   exit $rc after ${secs}s" | tee -a "$OUT/progress.log"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

skip_step() {
    printf '%s\tskipped\t0\t0\n' "$1" >>"$STEPS"
    echo "== $1: skipped ($2)" | tee -a "$OUT/progress.log"
}

# 1. the scale path at 6.25e9 parameters, both architectures
for arch in gqa_swiglu mha_gelu; do
    if [ "$arch" = gqa_swiglu ]; then reserve=230; else reserve=140; fi
    [ "$MODE" = smoke ] && reserve=$((reserve / 4))
    run_step "scale_$arch" "$SCALE_CAP" "$reserve" \
        "$PY" benchmarks/scale.py --params "$PARAMS" --arch "$arch" --device "$DEV" \
        ${SCALE_EXTRA[@]+"${SCALE_EXTRA[@]}"} --validate-device "${GPU_CHECK_SCALE_VALIDATE:-}" \
        --out "$WORK/scale_$arch" --json "$OUT/scale_$arch.json"
    if [ "$MODE" = smoke ] && [ "$arch" = gqa_swiglu ]; then
        mv "$WORK/scale_$arch" "$WORK/small" 2>/dev/null # smoke: already small, validated below
    fi
    rm -rf "$WORK/scale_$arch" # ~9 GB of weights on the GPU machine
done

# 2. cascade validate on the measuring device: a small cascade checkpoint, one budget that fits,
#    one below its weights (on cuda: set_per_process_memory_fraction -> out of memory, exit 3)
if [ "$MODE" = smoke ]; then
    skip_step validate_ckpt "smoke: scale_gqa_swiglu's checkpoint is validated instead"
else
    run_step validate_ckpt 75 110 \
        "$PY" benchmarks/scale.py --params "$SMALL_PARAMS" --arch gqa_swiglu --device "$DEV" \
        --validate-device "" --out "$WORK/small" --json "$OUT/validate_ckpt.json"
fi
CKPT="$WORK/small/checkpoint"
if [ -f "$CKPT/config.json" ]; then
    WEIGHTS=$(find "$CKPT" -name '*.safetensors' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    FIT_BUDGET=$((4 * 1024 ** 3))
    OOM_BUDGET=$((WEIGHTS / 4 > 1048576 ? WEIGHTS / 4 : 1048576))
    printf 'weights_bytes\t%s\nfit_budget_bytes\t%s\noom_budget_bytes\t%s\n' \
        "$WEIGHTS" "$FIT_BUDGET" "$OOM_BUDGET" >"$OUT/validate_budgets.tsv"
    run_step validate_fit 50 85 --stdout "$OUT/validate_fit.json" \
        "$PY" -m runner.cli validate "$CKPT" --device dgx_spark --budget-bytes "$FIT_BUDGET" --json
    run_step validate_oom 50 60 --stdout "$OUT/validate_oom.json" \
        "$PY" -m runner.cli validate "$CKPT" --device dgx_spark --budget-bytes "$OOM_BUDGET" --json
else
    skip_step validate_fit "no checkpoint from validate_ckpt"
    skip_step validate_oom "no checkpoint from validate_ckpt"
fi

# 3. dense vs pruned inference latency and peak memory, measured on the device
run_step inference 150 "$RECOVERY_RESERVE" \
    "$PY" benchmarks/inference.py --on "$DEV" ${INFERENCE_EXTRA[@]+"${INFERENCE_EXTRA[@]}"} --json "$OUT/inference.json"

# 4. tokens/s of a LoRA recovery step (fp32 / bf16 autocast, LM head + loss whole or chunked) on a
#    random model of SmolLM2-135M's shape, against the device's measured fp32 / bf16 matmul peak
run_step recovery_speed "$RECOVERY_RESERVE" 0 \
    "$PY" benchmarks/recovery_speed.py --json "$OUT/recovery_speed.json" step --device "$DEV" \
    "${RECOVERY_EXTRA[@]}"

# summary.json: steps, key figures, targets (no torch import: seconds)
"$PY" - "$OUT" "$MODE" "$START" <<'EOF' 2>&1 | tee -a "$OUT/progress.log"
import json
import re
import sys
import time
from pathlib import Path

out, mode, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
GIB = 2**30
TARGETS = {"cascade_seconds_max": 900, "peak_gib_max": 45, "calibration_mfu_min": 0.40}
EXPECTED_RC = {"validate_fit": 0, "validate_oom": 3}


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    steps[name] = {
        "exit": None if rc == "skipped" else int(rc),
        "status": "skipped"
        if rc == "skipped"
        else ("timeout" if rc in ("124", "137") else ("ok" if rc == "0" else "failed")),
        "seconds": float(secs),
        "timeout_s": int(limit),
        "log": f"{name}.log",
    }
for name, rc in EXPECTED_RC.items():
    if name in steps:
        steps[name]["expected_exit"] = rc
        steps[name]["status"] = "ok" if steps[name]["exit"] == rc else steps[name]["status"]


def phases_from_log(name):
    """Per-phase lines scale.py printed before it stopped (when its JSON is missing)."""
    try:
        text = (out / f"{name}.log").read_text()
    except OSError:
        return {}
    found = re.findall(r"^\s+(\w+)\s+([\d.]+) s\s+peak\s+([\d.]+) GiB", text, re.M)
    return {p: {"seconds": float(s), "peak_gib": float(g)} for p, s, g in found}


figures = {}
for arch in ("gqa_swiglu", "mha_gelu"):
    r = load(f"scale_{arch}.json")
    if r is None:
        figures[f"scale_{arch}"] = {
            "result": None,
            "phases_from_log": phases_from_log(f"scale_{arch}"),
        }
        continue
    cal = r["phases"]["calibration"]
    peak = r["peak_bytes"] / GIB
    fig = {
        "gpu": r["gpu"],
        "dense_params": r["dense_params"],
        "pruned_params": r["pruned_params"],
        "cascade_seconds": r["cascade_seconds"],
        "peak_gib": round(peak, 2),
        "calibration_mfu": round(r["calibration_mfu"], 4),
        "matmul_tflops_measured": float(f"{cal['matmul_flops_per_s'] / 1e12:.4g}"),
        "calibration_tflops_achieved": float(f"{cal['achieved_flops_per_s'] / 1e12:.4g}"),
        "phase_seconds": {k: v["seconds"] for k, v in r["phases"].items()},
        "phase_peak_gib": {k: round(v["peak_bytes"] / GIB, 2) for k, v in r["phases"].items()},
    }
    fig["targets"] = {
        "cascade <= 15 min": r["cascade_seconds"] <= TARGETS["cascade_seconds_max"],
        "peak <= 45 GiB": peak <= TARGETS["peak_gib_max"],
        "calibration MFU >= 40%": r["calibration_mfu"] >= TARGETS["calibration_mfu_min"],
    }
    figures[f"scale_{arch}"] = fig

budgets = {}
try:
    for line in (out / "validate_budgets.tsv").read_text().splitlines():
        key, value = line.split("\t")
        budgets[key] = int(value)
except OSError:
    pass
for name in ("validate_fit", "validate_oom"):
    r = load(f"{name}.json")
    figures[name] = r and {
        "fits": r["fits"],
        "oom": r["oom"],
        "fits_basis": r["fits_basis"],
        "budget_bytes": r["budget_bytes"],
        "measured_on": r["measured_on"],
        "measured_peak_bytes": r["measured_peak_bytes"],
        "analytic_bytes": r["analytic_bytes"],
        "latency_ms_pruned": r["latency_ms"]["pruned"],
        "measure_note": r["measure_note"],
    }
figures["validate_budgets"] = budgets
if mode == "gpu" and "validate_oom" in steps:  # on cuda the low budget must end out of memory
    oom = bool(figures["validate_oom"] and figures["validate_oom"]["oom"])
    steps["validate_oom"]["oom_expected"] = True
    if not oom and steps["validate_oom"]["status"] == "ok":
        steps["validate_oom"]["status"] = "no_oom"

r = load("inference.json")
figures["inference"] = r and [
    {
        "model": row["model"],
        "measured_on": row["measured_on"],
        "params": row["params"],
        "latency_ms": row["latency_ms"],
        "peak_bytes": row["peak_bytes"],
        "reductions": row["reductions"],
    }
    for row in r["rows"]
]

r = load("recovery_speed.json")
figures["recovery_speed"] = r and {
    "device": r["device"],
    "model": r["model"],
    "tokens_per_step": r["tokens_per_step"],
    "step_gflop": r["step_gflop"],
    "peak_gflops": r["peak_gflops"],
    "variants": {
        name: {k: v[k] for k in ("tokens_per_s", "gflop_per_s", "of_own_peak")}
        for name, v in r["variants"].items()
    },
}

summary = {
    "mode": mode,
    "note": "smoke: CPU, tiny models; figures check the plumbing only" if mode == "smoke" else None,
    "total_seconds": round(time.time() - start, 1),
    "targets": TARGETS,
    "steps": steps,
    "figures": figures,
}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

print(f"\nsummary ({mode}, {summary['total_seconds']:.0f} s) -> {out / 'summary.json'}")
for name, s in steps.items():
    extra = f" (expected {s['expected_exit']})" if "expected_exit" in s else ""
    print(f"  {name:<18} {s['status']:<8} exit {s['exit']}{extra}, {s['seconds']:.1f} s")
for arch in ("gqa_swiglu", "mha_gelu"):
    f = figures[f"scale_{arch}"]
    if "cascade_seconds" not in f:
        print(f"  scale {arch}: no result; phases logged: {f['phases_from_log']}")
        continue
    met = {k: "met" if v else "MISSED" for k, v in f["targets"].items()}
    print(
        f"  scale {arch} {f['dense_params'] / 1e9:.2f}B -> {f['pruned_params'] / 1e9:.2f}B: "
        f"cascade {f['cascade_seconds']:.0f} s (target <= 900: {met['cascade <= 15 min']}), "
        f"peak {f['peak_gib']:.1f} GiB (<= 45: {met['peak <= 45 GiB']}), "
        f"calibration MFU {f['calibration_mfu']:.1%} of {f['matmul_tflops_measured']} TFLOP/s "
        f"measured (>= 40%: {met['calibration MFU >= 40%']})"
    )
for name in ("validate_fit", "validate_oom"):
    f = figures[name]
    if f:
        print(
            f"  {name}: fits={f['fits']} oom={f['oom']} basis={f['fits_basis']} "
            f"budget={f['budget_bytes']} on={f['measured_on']} peak={f['measured_peak_bytes']}"
        )
for row in figures["inference"] or []:
    print(
        f"  inference {row['model']} on {row['measured_on']}: latency ms {row['latency_ms']}, "
        f"peak bytes {row['peak_bytes']}"
    )
f = figures["recovery_speed"]
if f:
    print(f"  recovery step on {f['device']} ({f['model']}, {f['tokens_per_step']} tokens, "
          f"{f['step_gflop']} GFLOP; matmul peak {f['peak_gflops']} GFLOP/s):")
    for name, v in f["variants"].items():
        print(f"    {name:<11} {v['tokens_per_s']:>9} tokens/s  {v['gflop_per_s']:>8} GFLOP/s  "
              f"{v['of_own_peak']:.1%} of its dtype's peak")
EOF
echo "gpu_check done in $(($(date +%s) - START)) s" | tee -a "$OUT/progress.log"
