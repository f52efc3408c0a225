#!/usr/bin/env bash
# Interleaved cold `featx extract` runs of an older commit and of this tree, same data, so
# a slow period of the machine shows in both. Prints images/s and wall/user/sys CPU seconds
# (user CPU about equal to wall = one core's worth: a half-speed run).
# Usage: benchmarks/versions.sh OLD_COMMIT DATA [PAIRS]
# With SHARED_STORE=1 the old commit's runs read the same prebuilt ONNX export as this
# tree's (for an old commit that already has the ONNX runtime; otherwise each of its cold
# runs would pay for its own export).
set -euo pipefail
old=$1; data=$(realpath "$2"); pairs=${3:-6}
here=$(cd "$(dirname "$0")/.." && pwd)
python=$here/.venv/bin/python
tree=$(mktemp -d); git -C "$here" worktree add -q --detach "$tree" "$old"
store=$(mktemp -d)  # this tree's ONNX export, built once before the pairs
trap 'git -C "$here" worktree remove --force "$tree"; rm -rf "$store"' EXIT
run() {  # $1: label, $2: directory to run from (its featx/ is imported), $3: extra env
  local cache; cache=$(mktemp -d)
  out=$( { cd "$2" && env $3 /usr/bin/time -f "TIME %e %U %S" "$python" -m featx extract \
           "$data" --cache-dir "$cache" --no-progress --json; } 2>&1 )
  ips=$(echo "$out" | grep '^{' | tail -1 | "$python" -c \
        "import json,sys; print(json.load(sys.stdin)['images_per_second'])")
  echo "$1 images/s=$ips $(echo "$out" | grep '^TIME')"
  rm -rf "$cache"
}
run "export (not counted)" "$here" "FEATX_ONNX_STORE=$store" >/dev/null
for i in $(seq "$pairs"); do
  run "$i old" "$tree" "PYTHONPATH=$tree${SHARED_STORE:+ FEATX_ONNX_STORE=$store}"
  run "$i new" "$here" "FEATX_ONNX_STORE=$store"
done
