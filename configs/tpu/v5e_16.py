"""A Cloud TPU v5e-16 slice (v5litepod-16: 4 hosts x 4 chips), data x fsdp.

python launch/tpu.py create --name lm5e --zone us-west4-a --accelerator v5litepod-16 --spot
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'gpt2_124m.py'))
  c.data.data_dir = 'gs://YOUR_BUCKET/tensorflow_datasets'
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 24, 16, 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 4, 1
  c.train.batch_size = 256
  # Two microbatches of 128: the whole batch at once needs 17.3 GiB a 16 GiB chip
  # (--compile_only --topology v5litepod-16).
  c.train.microbatches = 2
  c.train.eval_batch_size = 256
  return c
