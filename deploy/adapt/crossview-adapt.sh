#!/bin/sh
# One site adaptation run: train on the harvested crops, export the candidate model. Safe to start twice.
#
# The same script runs as the adapt container's command (deploy/docker, compose profile `adapt`, the k8s
# CronJob) and under systemd (crossview-adapt.service). A scheduler may start a run twice (a CronJob after a
# missed schedule, a timer with Persistent=true after boot, an operator by hand), so:
#   - one run per period (CROSSVIEW_ADAPT_PERIOD, a date(1) format; default one per ISO week): a run whose
#     `done` marker exists is not repeated (CROSSVIEW_ADAPT_RUN_ID=... starts a named one on purpose);
#   - an interrupted run resumes from its last checkpoint (`crossview train --resume`) instead of starting over;
#   - a lock file keeps two runs from sharing the state folder (k8s: concurrencyPolicy Forbid as well);
#   - the candidate appears under candidates/ only complete (written beside it, then renamed).
#
# Today the candidate is NOT rolled out: an operator checks it and renames it over the edges' model file
# (deploy/README.md, "Rolling out a model").
# FUTURE (issue 14): `crossview adapt --config /etc/crossview/adapt.yaml` replaces this script's two steps:
# collect the harvest through the matcher's API, adapt, gate against the production model, register the
# candidate in the matcher's model registry; edges then poll the registry and roll it out.
set -eu

CONFIG=${CROSSVIEW_ADAPT_CONFIG:-/etc/crossview/adapt/train.yaml}
STATE=${CROSSVIEW_ADAPT_STATE:-/var/lib/crossview/adapt}
PERIOD=${CROSSVIEW_ADAPT_PERIOD:-%G-W%V}
RUN_ID=${CROSSVIEW_ADAPT_RUN_ID:-$(date -u +"$PERIOD")}
RUN="$STATE/runs/$RUN_ID"

mkdir -p "$STATE/runs" "$STATE/candidates"
exec 9>"$STATE/lock"
if ! flock -n 9; then
    echo "crossview-adapt: another run holds $STATE/lock; nothing to do"
    exit 0
fi
if [ -e "$RUN/done" ]; then
    echo "crossview-adapt: run $RUN_ID finished already ($RUN/done); nothing to do"
    exit 0
fi

# The train config's `output_dir: ${CROSSVIEW_ADAPT_RUN_DIR}` puts checkpoints and metrics in this run's folder.
export CROSSVIEW_ADAPT_RUN_DIR="$RUN"
mkdir -p "$RUN"
echo "crossview-adapt: run $RUN_ID, config $CONFIG, folder $RUN"
if [ -e "$RUN/last.pt" ]; then
    crossview train --config "$CONFIG" --resume
else
    crossview train --config "$CONFIG"
fi

partial="$STATE/candidates/.$RUN_ID.partial.onnx"
crossview export "$RUN/last.pt" --out "$partial"
mv -f "$partial" "$STATE/candidates/$RUN_ID.onnx"
date -u +%Y-%m-%dT%H:%M:%SZ >"$RUN/done"
echo "crossview-adapt: candidate model $STATE/candidates/$RUN_ID.onnx (not rolled out; see deploy/README.md)"
