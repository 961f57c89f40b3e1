#!/usr/bin/env bash
# A CI model-release step: average a run's checkpoints, record exactly what went in, fail loudly.
#
#   release-ema.sh CHECKPOINT_DIR RELEASE_DIR [DECAY]
#
# Produces RELEASE_DIR/model-ema.safetensors, RELEASE_DIR/model-ema.mapping.json (names,
# settings, every input with its size and sha256) and RELEASE_DIR/release.json (the --json
# summary: the same plus the output's sha256). Identical inputs give identical bytes, so a
# re-run of the pipeline can be checked byte for byte. Any bad input fails the job (status 2).
set -euo pipefail

ckpt_dir=${1:?usage: release-ema.sh CHECKPOINT_DIR RELEASE_DIR [DECAY]}
release_dir=${2:?usage: release-ema.sh CHECKPOINT_DIR RELEASE_DIR [DECAY]}
decay=${3:-0.999}
mkdir -p "$release_dir"

# Plan first: a dry run validates every checkpoint and shows each one's weight in the log.
ema-cli average "$ckpt_dir"/*.safetensors -o "$release_dir/model-ema.safetensors" \
    --decay "$decay" --num-updates step --dry-run

ema-cli average "$ckpt_dir"/*.safetensors -o "$release_dir/model-ema.safetensors" \
    --decay "$decay" --num-updates step --hash --json -q > "$release_dir/release.json"

python3 - "$release_dir/release.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
(final,) = [o for o in summary["outputs"] if o["path"] == summary["output"]]
print(f"released {final['path']} ({final['size']} bytes, sha256 {final['sha256']})")
print(f"from {len(summary['checkpoints'])} checkpoints, steps "
      f"{summary['checkpoints'][0]['step']}..{summary['checkpoints'][-1]['step']}")
PY
