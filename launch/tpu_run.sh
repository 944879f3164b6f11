#!/usr/bin/env bash
# Launch perpo-jax on every host of a TPU pod slice.
#
#   launch/tpu_run.sh TPU_NAME ZONE configs/llava15_7b_refcoco_perpo.yaml [overrides...]
#
# Copies this checkout to every worker, installs the pinned requirements with the TPU
# jaxlib, and runs `perpo-jax train` on all hosts at once (JAX multi-host: each host
# runs the same program; jax.distributed.initialize() discovers the slice itself).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [section.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
OVERRIDES=("$@")
REMOTE_DIR=${REMOTE_DIR:-perpo_jax}
JAX_VERSION=$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

echo "[tpu_run] syncing checkout to all workers of $TPU_NAME"
tar czf /tmp/perpo_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git -C "$(dirname "$0")/.." .
gcloud compute tpus tpu-vm scp /tmp/perpo_jax_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
ssh_all "mkdir -p $REMOTE_DIR && tar xzf /tmp/perpo_jax_src.tgz -C $REMOTE_DIR"

echo "[tpu_run] installing pinned requirements + jax[tpu]==$JAX_VERSION"
ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . \
  && .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"

echo "[tpu_run] training with $CONFIG ${OVERRIDES[*]:-}"
ssh_all "cd $REMOTE_DIR && PERPO_JAX_DISTRIBUTED=1 .venv/bin/perpo-jax train --config $CONFIG ${OVERRIDES[*]:-}"
