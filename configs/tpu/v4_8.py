"""One Cloud TPU v4-8 host (4 chips): a 350M-parameter GPT on lm1b, data parallel.

  python launch/tpu.py run --name lm --zone us-central2-b -- \
      --config configs/tpu/v4_8.py --workdir gs://YOUR_BUCKET/runs/v4_8

lm1b must be prepared in TFDS_DATA_DIR (gs://YOUR_BUCKET/tensorflow_datasets).
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'gpt2_124m.py'))
  c.data.data_dir = 'gs://YOUR_BUCKET/tensorflow_datasets'
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 24, 16, 1024
  c.model.remat = 'dots'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1  # the 4 chips
  c.train.batch_size = 128
  # Two microbatches of 64: the whole batch at once needs 36.7 GiB a 32 GiB chip
  # (--compile_only --topology v4-8).
  c.train.microbatches = 2
  c.train.eval_batch_size = 128
  return c
