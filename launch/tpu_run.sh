#!/usr/bin/env bash
# perpo-jax on a Cloud TPU VM / pod slice, driven by gcloud.  Run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh SUBCOMMAND [options] [args]

subcommands
  create                       create the TPU VM (slice)
  setup                        copy this checkout to every worker; install the pinned
                               requirements + jax[tpu] of the same version in ~/perpo_jax/.venv
  run CONFIG [key=value ...]   start `perpo-jax train` on ALL workers at once, detached;
                               each worker logs to ~/perpo_jax/logs/train.log
                               (checkpoint.dir is set to CHECKPOINT_DIR, a gs:// path)
  status                       the VM's state + whether training runs on each worker
  logs [--worker W] [--lines N]  last N lines (default 50) of the log of worker W (default all)
  stop                         SIGTERM to training on every worker: one agreed checkpoint,
                               then exit (rerun `run` with the same settings to resume)
  delete                       delete the TPU VM

options (or the environment variable in brackets)
  --name NAME                  [TPU_NAME]          TPU VM name (required)
  --zone ZONE                  [ZONE]              e.g. us-central2-b (required)
  --project PROJECT            [PROJECT]           gcloud project (default: gcloud's own)
  --accelerator-type TYPE      [ACCELERATOR_TYPE]  e.g. v5litepod-8, v4-8, v5p-8 (create)
  --runtime-version VERSION    [RUNTIME_VERSION]   TPU software version (create; default
                               from the type: v4 tpu-ubuntu2204-base, v5e
                               v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                       [SPOT=1]            spot (preemptible) capacity (create)
  --checkpoint-dir GS_URL      [CHECKPOINT_DIR]    gs://bucket/path, shared by every host (run)
  --dry-run                    [DRY_RUN=1]         print every gcloud command, run nothing
  -h, --help                   this text

example
  export TPU_NAME=perpo ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 CHECKPOINT_DIR=gs://my-bucket/perpo
  launch/tpu_run.sh create --spot
  launch/tpu_run.sh setup
  launch/tpu_run.sh run configs/llava15_7b_refcoco_perpo.yaml model.hf_path=/models/llava-1.5-7b-hf
  launch/tpu_run.sh logs --worker 0
EOF
}

die() { echo "tpu_run: $*" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=perpo_jax             # relative to the remote home directory
ARCHIVE=/tmp/perpo_jax_src.tgz
# gs:// checkpoints: orbax reaches GCS through etils.epath -> gcsfs (pins as requirements-test.txt)
GCSFS_PINS="gcsfs==2026.7.0 fsspec==2026.7.0"
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-}
SPOT=${SPOT:-0}
DRY_RUN=${DRY_RUN:-0}
WORKER=all
LINES=50
SUBCOMMAND=
ARGS=()

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) TPU_NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE=${2:?--accelerator-type needs a value}; shift 2 ;;
    --runtime-version) RUNTIME_VERSION=${2:?--runtime-version needs a value}; shift 2 ;;
    --checkpoint-dir) CHECKPOINT_DIR=${2:?--checkpoint-dir needs a value}; shift 2 ;;
    --worker) WORKER=${2:?--worker needs a value}; shift 2 ;;
    --lines) LINES=${2:?--lines needs a value}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else ARGS+=("$1"); fi; shift ;;
  esac
done

[[ -n $SUBCOMMAND ]] || { usage >&2; exit 2; }
case $SUBCOMMAND in
  create|setup|run|status|logs|stop|delete) ;;
  *) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac

# Prints (dry run) or runs one command; the printed form is shell-quoted, copy-pasteable.
do_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    local arg out=()
    for arg in "$@"; do
      if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name} ]] || die "$SUBCOMMAND needs $name (flag --$(echo "$name" | tr '[:upper:]_' '[:lower:]-' | sed 's/^tpu-//') or environment)"
  done
}

where() {
  WHERE=(--zone "$ZONE")
  [[ -z $PROJECT ]] || WHERE+=(--project "$PROJECT")
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  do_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" "--worker=$1" --command "$2"
}

default_runtime() {
  case $ACCELERATOR_TYPE in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --runtime-version" ;;
  esac
}

require TPU_NAME ZONE
where
PID_FILE=$REMOTE_DIR/logs/train.pid
LOG_FILE=$REMOTE_DIR/logs/train.log

case $SUBCOMMAND in
  create)
    require ACCELERATOR_TYPE
    [[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime)
    CMD=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}"
         --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
    [[ $SPOT != 1 ]] || CMD+=(--spot)
    do_cmd "${CMD[@]}"
    ;;
  setup)
    JAX_VERSION=$(sed -n 's/^jax==//p' "$HERE/requirements.txt")
    [[ -n $JAX_VERSION ]] || die "requirements.txt pins no jax==VERSION"
    do_cmd tar czf "$ARCHIVE" --exclude=.venv --exclude=runs --exclude=.git -C "$HERE" .
    do_cmd gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$ARCHIVE" "${WHERE[@]}" --worker=all
    ssh_workers all "mkdir -p $REMOTE_DIR && tar xzf $ARCHIVE -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . && .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' $GCSFS_PINS"
    ;;
  run)
    [[ ${#ARGS[@]} -ge 1 ]] || die "run needs CONFIG [section.key=value ...]"
    require CHECKPOINT_DIR
    [[ $CHECKPOINT_DIR == gs://* ]] || die "CHECKPOINT_DIR must be a gs:// URL that every host of the slice writes to, got '$CHECKPOINT_DIR'"
    TRAIN=(env PERPO_JAX_DISTRIBUTED=1 .venv/bin/perpo-jax train --config "${ARGS[0]}"
           "checkpoint.dir=$CHECKPOINT_DIR" "${ARGS[@]:1}")
    QUOTED=$(printf '%q ' "${TRAIN[@]}")
    ssh_workers all "cd $REMOTE_DIR && mkdir -p logs && nohup ${QUOTED}> logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid"
    ;;
  status)
    do_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state,acceleratorType,health)'
    ssh_workers all "if kill -0 \$(cat $PID_FILE 2>/dev/null) 2>/dev/null; then echo \"\$(hostname): training\"; else echo \"\$(hostname): not training\"; fi; tail -n 1 $LOG_FILE 2>/dev/null || true"
    ;;
  logs)
    [[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number"
    ssh_workers "$WORKER" "tail -n $LINES $LOG_FILE"
    ;;
  stop)
    ssh_workers all "kill -TERM \$(cat $PID_FILE) 2>/dev/null || echo \"\$(hostname): not training\""
    ;;
  delete)
    do_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
