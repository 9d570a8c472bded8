#!/usr/bin/env bash
# The GPU benchmark and checks, in one command on the GPU machine (see docs/benchmarks.md).
# Expects the CUDA build of palm at $PALM (default .devcarry/palm, or .devcarry/palm.gz as
# `cargo xtask bench gpu` leaves it). Writes to $OUT:
# results.jsonl (one JSON object per measurement or check), logs.txt, demo_gpu_summary.json.
# Part: all | checks | palm | torch | probe (cold start vs a warm kernel cache) | profile
# (device time per kernel, CubeCL's log) | ncu (Nsight Compute: every kernel of one training
# step, cuBLASLt's included, with launch shapes and DRAM/SM throughput).
# Knobs (environment): PRECISIONS and MODES (palm's and PyTorch's float settings),
# TRAIN_BATCHES, NODROP_BATCHES (also without dropout on both sides), DECODE=0 (training
# only), TRAIN=0 (decoding only, palm's and PyTorch's), FIXTURE=0 / UNIT=0 / DEMO=0 (parts
# of checks), FIXTURE_DEVICES (default "cpu cuda burn"; cpu is the reference and must stay), DEMO_ARGS,
# DECODE_ARGS (more `palm bench decode` flags, e.g. --reads every-step), PROFILE_PARTS (train
# and/or decode), SAVE_CACHE=0, *_TIMEOUT, TRACE=1 (palm's part also writes each kernel's
# device time after its timed steps: `palm bench --trace`,
# $OUT/trace_{train,decode}_PREC.jsonl), HOST_PROFILE=1 (palm's part also samples the host's
# stacks over the timed steps: `palm bench --host-profile`, $OUT/host/*.folded); palm's own
# switches pass through (PALM_GEMM=burn, PALM_BACKWARD=burn, PALM_GEMM_MIN_MACS,
# PALM_CROSS_ATTENTION=decomposed, PALM_FUSION=1, PALM_KERNELS=burn, PALM_GEMM_STREAM=own,
# PALM_AFFINE=composed, PALM_FFN=wide, PALM_ATTENTION=wide, PALM_ATTENTION_GEMM=burn|recopy,
# PALM_SHADOW=on, PALM_GEMM_SUBMIT=wait, PALM_STEP=burn).
# REV names the binary's commit in results.jsonl: pass the one `cargo xtask bench gpu` prints
# (`git rev-parse` on the GPU machine reports the tree it was handed, not the build's).
set -uo pipefail
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# libcupti (palm finds CubeCL's stream through it) may live among the toolkit's extras.
[[ -d $CUDA_PATH/extras/CUPTI/lib64 ]] && LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$CUDA_PATH/extras/CUPTI/lib64
PALM=${PALM:-.devcarry/palm}
[[ ! -x $PALM && -f $PALM.gz ]] && gunzip -kf "$PALM.gz" && chmod +x "$PALM"
OUT=${OUT:-/tmp/palm-bench}
W=$(mktemp -d)
PART=${1:-all}
mkdir -p "$OUT"
R="$OUT/results.jsonl"
L="$OUT/logs.txt"
echo "{\"device\": \"$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)\", \"rev\": \"${REV:-unknown}\", \"date\": \"$(date -u +%FT%TZ)\"}" >> "$R"

# palm keeps CubeCL's compiled kernels (PTX) and autotune results in PALM_KERNEL_CACHE. The
# GPU machine starts bare each session: the cache is carried in from an earlier run as
# .devcarry/cubecl-cache.txz.NN and returned as $OUT/cubecl-cache.txz.NN (an xz-compressed
# tar cut into 15 MB parts: the device tool returns files of at most 16 MiB; xz takes the
# 470 MB of PTX to about 17 MB where gzip left 42, and the carry is limited to 64 MiB), so
# the per-shape JIT compilation and autotuning (minutes) are paid once, as on a user's own
# machine. Gzipped parts (cubecl-cache.tgz.NN, earlier runs) are still read.
# Several invocations in one device command can share one unpacked cache: set
# PALM_KERNEL_CACHE to a directory outside $OUT and SAVE_CACHE=0 on all but the last.
export PALM_KERNEL_CACHE=${PALM_KERNEL_CACHE:-$W/cubecl-cache}
mkdir -p "$PALM_KERNEL_CACHE"
# A cache an earlier part of this command left in $OUT is newer than the carried one.
for c in "$OUT/cubecl-cache" .devcarry/cubecl-cache; do
    if [[ -n $(ls -A "$PALM_KERNEL_CACHE") ]]; then
        break
    elif [[ -f $c.txz.00 ]]; then
        cat "$c".txz.[0-9][0-9] | xz -dc -T0 | tar x -C "$PALM_KERNEL_CACHE" && break
    elif [[ -f $c.tgz.00 ]]; then
        cat "$c".tgz.[0-9][0-9] | tar xz -C "$PALM_KERNEL_CACHE" && break
    fi
done
# Written aside and moved into place, so a run killed while saving leaves the previous parts.
save_cache() {
    mkdir -p "$W/save" &&
        tar c -C "$PALM_KERNEL_CACHE" . | xz -6 -T0 -c | split -b 15m -d - "$W/save/cubecl-cache.txz." &&
        rm -f "$OUT"/cubecl-cache.t?z.* && mv "$W"/save/cubecl-cache.txz.* "$OUT/"
}
[[ ${SAVE_CACHE:-1} == 1 ]] && trap save_cache EXIT

# Runs a command with its peak device memory sampled by nvidia-smi every 100 ms.
peak() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/mem" &
    local sampler=$!
    "$@"
    local rc=$?
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
    echo "{\"peak_memory_mib_sampled\": $(sort -n "$W/mem" | tail -1), \"rc\": $rc, \"cmd\": \"$*\"}" >> "$R"
}

if [[ $PART == probe ]]; then
    # Cold start and steady state of one training configuration, twice: the second process
    # starts from the caches the first one filled.
    for run in 1 2; do
        start=$(date +%s)
        peak timeout ${PROBE_TIMEOUT:-300} $PALM bench train --device cuda --precision ${PREC:-f32} \
            --batch-size ${B:-8} --steps 5 --warmup-steps 3 >> "$R" 2>> "$L"
        echo "{\"probe_run\": $run, \"seconds\": $(( $(date +%s) - start ))}" >> "$R"
    done
fi
if [[ $PART == profile ]]; then
    # Per-kernel device time of a training step (batch ${B:-256}) and of a beam search (batch
    # 64), from CubeCL's profiling log (every kernel timed, so slower than a normal run), summed
    # by kernel into $OUT/profile_{train,decode}.txt.
    for what in ${PROFILE_PARTS:-train decode}; do
        case $what in
            train) args="--batch-size ${B:-256} --steps 2 --warmup-steps 2" ;;
            decode) args="--batch-size 64 --steps 1 --warmup-steps 1" ;;
        esac
        CUBECL_DEBUG_LOG="$W/profile_$what.log" timeout ${PROFILE_TIMEOUT:-200} \
            $PALM bench $what --device cuda --precision ${PREC:-f32} $args >> "$R" 2>> "$L"
        python3 - "$W/profile_$what.log" > "$OUT/profile_$what.txt" <<'PY'
import collections, re, sys
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
total, count = collections.Counter(), collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\|\s*([\d.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$", line.strip())
    if m:
        name = re.sub(r"<.*", "", m.group(3)).strip()[:100]
        total[name] += float(m.group(1)) * unit[m.group(2)]
        count[name] += 1
all_s = sum(total.values()) or 1.0
print(f"{'seconds':>9} {'share':>6} {'calls':>7}  kernel  (total {all_s:.3f} s)")
for name, s in total.most_common(40):
    print(f"{s:9.4f} {100 * s / all_s:5.1f}% {count[name]:7d}  {name}")
PY
    done
fi
if [[ $PART == ncu ]]; then
    # Training steps at batch ${B:-256} under ncu, after skipping the model's initialisation and
    # the warm-up steps' launches (NCU_SKIP; about 3,800 launches per step at batch 256 with
    # cuBLASLt, 400 to initialise). NCU_CHUNKS processes each measure NCU_COUNT consecutive
    # launches, one after the other (a killed process loses only its own chunk). Measured
    # 2026-11-30: with the three default metrics (several replay passes, each saving and
    # restoring the ~90 GB the step holds) ncu profiled 11 launches in 95 s, so the default is
    # now the kernel time alone (one pass, NCU_METRICS to change it).
    NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
    count=${NCU_COUNT:-950}
    for ((c = 0; c < ${NCU_CHUNKS:-4}; c++)); do
        timeout -k 10 ${NCU_TIMEOUT:-120} $NCU --launch-skip $(( ${NCU_SKIP:-8500} + c * count )) \
            --launch-count $count --cache-control none \
            --metrics ${NCU_METRICS:-gpu__time_duration.sum} \
            --csv --page raw $PALM bench train --device cuda --precision ${PREC:-f32} \
            --batch-size ${B:-256} --steps 2 --warmup-steps 2 > "$W/ncu_$c.csv" 2>> "$L"
        echo "{\"ncu_chunk\": $c, \"rc\": $?}" >> "$R"
        # A killed profiler's target can hold its device memory for a while (the next chunk
        # ran out of memory): wait for it to go.
        pkill -9 -f "$PALM bench" 2>/dev/null
        for _ in $(seq 30); do
            (( $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1) < 2000 )) && break
            sleep 1
        done
    done
    python3 xtask/bench/ncu_summary.py "$W"/ncu_*.csv > "$OUT/ncu_train.txt"
fi
if [[ $PART == all || ($PART == checks && ${FIXTURE:-1} == 1) ]]; then
    # CUDA against CPU on the unseen fixture model: per-row NLL and beam outputs.
    M=crates/model/tests/fixtures/unseen
    python3 -c "import json; g=json.load(open('$M/golden.json'))
print(''.join(json.dumps({'src': s, 'tgt': t}, ensure_ascii=False) + '\n' for s, t in zip(g['src'], g['tgt'])), end='')" > "$W/eval.jsonl"
    # cuda: the default, every product through cuBLASLt; burn: burn's kernels for every
    # product (PALM_GEMM=burn).
    for d in ${FIXTURE_DEVICES:-cpu cuda burn}; do
        dev=${d/burn/cuda}
        gemm=$([[ $d == burn ]] && echo burn)
        PALM_GEMM=$gemm timeout ${CHECK_TIMEOUT:-600} $PALM score --model $M --input "$W/eval.jsonl" --device $dev \
            --output "$W/score_$d.jsonl" 2>> "$L"
        PALM_GEMM=$gemm timeout ${CHECK_TIMEOUT:-600} $PALM generate --model $M --input "$W/eval.jsonl" --device $dev \
            --beam-size 4 --alpha 0.95 --min-length 3 --max-length 24 --batch-size 16 \
            --output "$W/gen_$d.jsonl" >> "$L" 2>&1
    done
    python3 - "$W" ${FIXTURE_DEVICES:-cpu cuda burn} >> "$R" <<'PY'
import json, sys
w = sys.argv[1]
rows = lambda f: [json.loads(l) for l in open(f"{w}/{f}")]
cpu = rows("score_cpu.jsonl")
for d in (d for d in sys.argv[2:] if d != "cpu"):
    try:
        gpu = rows(f"score_{d}.jsonl")
    except (OSError, ValueError) as e:
        print(json.dumps({"check": f"{d}_vs_cpu_unseen", "error": str(e)}))
        continue
    rel = max(abs(a["nll"] - b["nll"]) / max(abs(a["nll"]), 1e-9) for a, b in zip(cpu, gpu))
    per_token = max(abs(a["nll"] - b["nll"]) / a["tokens"] for a, b in zip(cpu, gpu))
    try:
        same = sum(a["pred"] == b["pred"] for a, b in zip(rows("gen_cpu.jsonl"), rows(f"gen_{d}.jsonl")))
    except (OSError, ValueError):
        same = None
    print(json.dumps({"check": f"{d}_vs_cpu_unseen", "rows": len(cpu), "scored": len(gpu),
                      "nll_max_rel_diff": rel, "nll_max_abs_diff_per_token": per_token,
                      "generate_identical": same}))
PY
fi
# The binary's CUDA unit tests: the cuBLASLt route against burn's matmul with gradients, the
# CUPTI stream search, the row kernels against burn's operations.
if [[ ($PART == all || $PART == checks) && -f .devcarry/palm-unit.gz && ${UNIT:-1} == 1 ]]; then
    gunzip -kf .devcarry/palm-unit.gz
    for t in cublaslt kernels; do
        timeout ${UNIT_TIMEOUT:-300} .devcarry/palm-unit $t >> "$L" 2>&1
        echo "{\"check\": \"${t}_unit_tests\", \"rc\": $?}" >> "$R"
    done
fi
if [[ $PART == all || ($PART == checks && ${DEMO:-1} == 1) ]]; then
    # A short fine-tuning run on the demo data, to compare with the CPU run's metrics.
    start=$(date +%s)
    PALM_PLAIN=1 timeout ${DEMO_TIMEOUT:-300} $PALM train --device cuda --out "$W/demo" ${DEMO_ARGS:-} > "$W/demo.log" 2>&1
    echo "{\"check\": \"demo_train_cuda\", \"rc\": $?, \"seconds\": $(( $(date +%s) - start ))}" >> "$R"
    tail -20 "$W/demo.log" >> "$L"
    cp "$W/demo/summary.json" "$OUT/demo_gpu_summary.json" 2>/dev/null
fi
if [[ $PART == all || $PART == palm ]]; then
    for prec in ${PRECISIONS:-f32 bf16-mixed bf16}; do
        [[ ${TRAIN:-1} == 1 ]] && peak timeout ${TRAIN_TIMEOUT:-240} $PALM bench train --device cuda \
            --precision $prec --batch-size ${TRAIN_BATCHES:-8,64,256} --steps 10 --warmup-steps 3 \
            ${TRACE:+--trace-steps 2 --trace "$OUT/trace_train_$prec.jsonl"} \
            ${HOST_PROFILE:+--host-profile "$OUT/host"} >> "$R" 2>> "$L"
        # NODROP_BATCHES: the same without dropout on either side (torch_palm.py --dropout 0).
        [[ -n ${NODROP_BATCHES:-} ]] && peak timeout ${TRAIN_TIMEOUT:-240} $PALM bench train \
            --device cuda --precision $prec --dropout 0 --batch-size $NODROP_BATCHES --steps 10 \
            --warmup-steps 3 >> "$R" 2>> "$L"
        [[ ${DECODE:-1} == 1 ]] && peak timeout ${DECODE_TIMEOUT:-150} $PALM bench decode --device cuda \
            --precision $prec --batch-size 1,64 --steps 3 --warmup-steps 1 ${DECODE_ARGS:-} \
            ${TRACE:+--trace-steps 1 --trace "$OUT/trace_decode_$prec.jsonl"} \
            ${HOST_PROFILE:+--host-profile "$OUT/host"} >> "$R" 2>> "$L"
    done
fi
if [[ $PART == all || $PART == torch ]]; then
    for mode in ${MODES:-fp32 tf32 bf16}; do
        [[ ${TRAIN:-1} == 1 ]] && timeout ${TORCH_TIMEOUT:-240} python3 xtask/bench/torch_palm.py \
            train --mode $mode --batch-size ${TRAIN_BATCHES:-8,64,256} >> "$R" 2>> "$L"
        [[ -n ${NODROP_BATCHES:-} ]] && timeout ${TORCH_TIMEOUT:-240} python3 xtask/bench/torch_palm.py \
            train --mode $mode --dropout 0 --batch-size $NODROP_BATCHES >> "$R" 2>> "$L"
        [[ ${DECODE:-1} == 1 ]] && timeout 150 python3 xtask/bench/torch_palm.py decode --mode $mode --batch-size 1,64 \
            --steps 3 --warmup-steps 1 >> "$R" 2>> "$L"
    done
fi
cat "$R"
