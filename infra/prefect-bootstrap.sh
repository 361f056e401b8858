#!/usr/bin/env bash
# What metareward's deployments need on a Prefect server, then the deployments themselves; safe to re-run (the
# compose stack's worker runs it at every start; run it by hand against any server, PREFECT_API_URL set):
# both work pools, the GPU pool's queues by priority, the automation that marks zombie flow runs crashed, and
# `prefect deploy --all`.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}

exists() { "$PREFECT" "$@" > /dev/null 2>&1; }

exists work-pool inspect metareward-process || "$PREFECT" work-pool create metareward-process --type process
exists work-pool inspect metareward-gpu || "$PREFECT" work-pool create metareward-gpu --type kubernetes \
  --base-job-template infra/kubernetes/gpu-base-job-template.json
# A shard of a campaign already running is served before a new campaign starts (priority 1 is served first).
for queue in "shards 1" "campaigns 2"; do
  set -- $queue
  exists work-queue inspect "$1" --pool metareward-gpu || \
    "$PREFECT" work-queue create "$1" --pool metareward-gpu --priority "$2"
done
exists automation inspect metareward-crash-zombie-flow-runs || \
  "$PREFECT" automation create --from-file deployments/automations.yaml
"$PREFECT" --no-prompt deploy --all
