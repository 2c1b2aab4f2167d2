#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), after bench/gpu/prepare.sh here, like run.sh:
#   run(command="bash bench/gpu/diagnose.sh", carry=[".whl", ".photos"], timeout_s=330)
# Tests the hypotheses of /work/gpu_diagnosis.md in priority order inside a BUDGET (default 270 s of this
# script's wall time; a part starts only with >= 20 s left and is cut at what is left), logging each part to
# $OUT/<part>.log and a digest to $OUT/summary.txt:
#   env              CPU counts (os.cpu_count vs affinity vs cgroup quota), loader default threads, versions
#   loader           decode-stage costs on one thread; loader alone at 4/8/16/32 threads with CPU use, page
#                    faults and context switches per image; cvtColor / no-Pillow-header / process variants
#   ft-lite0         Lite0 fine-tune on JAX (bench/finetune.py --probe, JAX_LOG_COMPILES=1, as run.sh: 420 photos,
#                    batch 128, 2 timed epochs): ours; ours with every batch padded to 128 rows (one shape); the
#                    device step alone (in-memory uint8 batches); XLA compiles (and batch shapes) per phase, step
#                    times, the batches the input made
#   extract-lite0    extract end to end twice in one process, cold (compile) and warm (cached runner), with a
#                    per-stage breakdown (feed wait, submit/compile, collect, writer, fsync, assembly)
#   ft-lite0-ablate  keras.io (its batch 32, the reference), keras.io at ours' batch (128), ours without
#                    augmentation, ours cast to float32 (1 timed epoch each; cut at the cap, finished sides kept)
#   compile-cache    extract cold twice in two processes sharing JAX_COMPILATION_CACHE_DIR
#   extract-resnet50 as extract-lite0, ResNet50 (weights none)
# PARTS picks some; SMOKE=1 runs tiny sizes on a CPU (e.g. SMOKE=1 SKIP_WHEELS=1 PYTHON=.venv/bin/python).
set -uo pipefail
source "$(dirname "$0")/setup.sh"
BUDGET="${BUDGET:-270}"
if [ -n "${SMOKE:-}" ]; then
    lrep=1; llim=48; lbs=16; lw="1,2"; lw1=2; erep=2; elim=16; ebs=8; size=96; fimg=28; fbs=8; kio=8; ep=1
else
    lrep=10; llim=0; lbs=256; lw="4,8,16,32"; lw1=16; erep=20; elim=0; ebs=256; size=224; fimg=2048; fbs=128; kio=128; ep=2
fi
parts="${PARTS:-env loader ft-lite0 extract-lite0 ft-lite0-ablate compile-cache extract-resnet50}"
summary="$OUT/summary.txt"; : > "$summary"
# JAX_LOG_COMPILES prints every argument's shape (~12 kB a line for a train step): keep the last two (x, y)
condense() {
    sed -E 's/^(Compiling [^ ]+) with global shapes and types .*ShapedArray\(([^)]*)\), ShapedArray\(([^)]*)\)\)\. Argument mapping.*/\1 ... data \2, \3/' \
        | cut -c1-1200
}
step() {  # name, cap seconds, command...: run one part inside the budget, log it, never stop the rest
    local name="$1" cap="$2"; shift 2
    case " $parts " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped (${left} s of the budget left)" | tee -a "$summary"; return 0; fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (cap ${cap} s): $*"
    local t0=$SECONDS
    timeout "$cap" "$@" 2>&1 | condense > "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
    { echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
      grep -E '^(gpu|env|stages|loader|extract|    |  probe|Keras backend|Compiling jit\(train_step\)|efficientnet|resnet|Traceback|[A-Za-z]*Error)' \
          "$OUT/$name.log" | grep -v '^    rc=' | cut -c1-700 | tail -n 60; } | tee -a "$summary"
}

if [[ " $parts " == *" env "* ]]; then
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: none"; } | sed 's/^/gpu: /' | tee "$OUT/gpu.log" >> "$summary"
fi
step env 30 "$py" bench/gpu/diagnose.py env
diag=(bench/gpu/diagnose.py)
step loader 60 bash -c "
    $py ${diag[*]} loader --data '$photos/train' --limit $llim --repeat $lrep --batch-size $lbs --workers $lw \
        --variants as-is --switchinterval 0.0005 &&
    $py ${diag[*]} loader --data '$photos/train' --limit $llim --repeat $lrep --batch-size $lbs --workers $lw1 \
        --variants cvt,nohdr,procs 2>&1 | grep -v '^stages'"
ft=(bench/finetune.py --data "$photos" --backbones efficientnet_lite0 --images "$fimg" --batch-size "$fbs" --size "$size"
    --augment --probe)
step ft-lite0 150 env KERAS_BACKEND=jax JAX_LOG_COMPILES=1 "$py" "${ft[@]}" --epochs "$ep" --sides ours,ours-pad,synth-u8
ex=(bench/gpu/diagnose.py extract --data "$photos/train" --limit "$elim" --repeat "$erep" --batch-size "$ebs"
    --image-size "$size" --precision mixed)
step extract-lite0 90 env KERAS_BACKEND=jax "$py" "${ex[@]}" --backbone efficientnet_lite0 --weights imagenet
step ft-lite0-ablate 120 env KERAS_BACKEND=jax JAX_LOG_COMPILES=1 "$py" "${ft[@]}" --epochs 1 \
    --sides "keras.io,keras.io@$kio,ours-noaug,ours-f32"
jcache="$OUT/jax-cache"; rm -rf "$jcache"
step compile-cache 80 env KERAS_BACKEND=jax JAX_COMPILATION_CACHE_DIR="$jcache" bash -c "
    $py ${ex[*]} --backbone efficientnet_lite0 --weights imagenet --runs 1 | sed 's/^extract cold/extract cache-fill cold/' &&
    $py ${ex[*]} --backbone efficientnet_lite0 --weights imagenet --runs 1 | sed 's/^extract cold/extract cache-hit cold/'"
rm -rf "$jcache"
step extract-resnet50 80 env KERAS_BACKEND=jax "$py" "${ex[@]}" --backbone resnet50 --weights none
echo "total $SECONDS s" | tee -a "$summary"
ls -la "$OUT"
