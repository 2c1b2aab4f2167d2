# Sourced by bench/gpu/run.sh and diagnose.sh, on the GPU machine: the repository root as working
# folder, $OUT and $py set, the carried wheels (.whl, from prepare.sh) on PYTHONPATH unless
# SKIP_WHEELS, and $photos the carried photo folder (checked).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
py="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ -z "${SKIP_WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
photos="$(realpath "${PHOTOS:-.photos}")"
[ -d "$photos/train" ] || { echo "no $photos/train: run bash bench/gpu/prepare.sh here first and carry .photos"; exit 1; }
