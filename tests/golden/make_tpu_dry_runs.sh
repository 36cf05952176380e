#!/usr/bin/env bash
# Regenerates the golden dry-run files that tests/test_launch.py compares against:
#   bash tests/golden/make_tpu_dry_runs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets
dry() {  # NAME ACCELERATOR CONFIG [create flags...]
  local name=$1 accelerator=$2 config=$3; shift 3
  for command in create setup run status stop delete; do
    local flags=(); [[ $command == create ]] && flags=("$@")
    python3 launch/tpu.py "$command" --name "$name" --zone us-central2-b --project my-project \
      --accelerator "$accelerator" "${flags[@]}" --dry_run -- --config "$config" \
      --workdir "gs://my-bucket/runs/$name" --config.train.num_steps=20000
  done
}
dry lm-v4-8 v4-8 configs/tpu/v4_8.py > tests/golden/tpu_v4_8.txt
dry lm-v4-32 v4-32 configs/tpu/v4_32.py --spot > tests/golden/tpu_v4_32.txt
