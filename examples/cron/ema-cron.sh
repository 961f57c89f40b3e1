#!/usr/bin/env bash
# Fold a live training run's new checkpoints into its EMA, from cron.
#
#   ema-cron.sh RUN_DIR [DECAY]
#
# Writes RUN_DIR/ema/ema.safetensors (+ ema.mapping.json) and keeps the EMA state in
# RUN_DIR/ema/state, so each run reads only the checkpoints saved since the last one. Safe to
# run as often as you like: a run that finds another one still working exits quietly (ema-cli's
# exit status 75), a checkpoint still being written is left for the next run, and a killed run
# leaves the previous average in place.
set -u

run_dir=${1:?usage: ema-cron.sh RUN_DIR [DECAY]}
decay=${2:-0.999}
ema_dir="$run_dir/ema"
mkdir -p "$ema_dir"

shopt -s nullglob
checkpoints=("$run_dir"/ckpt-*.safetensors)
if [ ${#checkpoints[@]} -eq 0 ]; then
    echo "$(date -u +%FT%TZ) $run_dir: no checkpoints yet"
    exit 0
fi

# --settle: a checkpoint modified in the last 2 minutes may still be being written.
summary=$(ema-cli average "${checkpoints[@]}" \
    -o "$ema_dir/ema.safetensors" --decay "$decay" --num-updates step \
    --state "$ema_dir/state" --settle "${EMA_SETTLE:-120}" --json -q)
status=$?
case $status in
    0)
        echo "$(date -u +%FT%TZ) $run_dir: $(printf '%s' "$summary" | python3 -c \
            'import json, sys; s = json.load(sys.stdin); print(s["status"] + ",", len(s["checkpoints"]), "checkpoints")')"
        ;;
    75)
        echo "$(date -u +%FT%TZ) $run_dir: another ema-cli run is busy; trying again next time"
        status=0
        ;;
    *)
        echo "$(date -u +%FT%TZ) $run_dir: ema-cli failed with status $status (see the error above)" >&2
        ;;
esac
exit $status
