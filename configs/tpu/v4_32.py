"""A Cloud TPU v4-32 slice: 4 hosts x 4 chips, fully sharded (fsdp=16). Every host
runs the same command; lmjax joins them through jax.distributed automatically.

  python launch/tpu.py create --name lm32 --zone us-central2-b --accelerator v4-32 --spot
  python launch/tpu.py setup --name lm32 --zone us-central2-b
  python launch/tpu.py run --name lm32 --zone us-central2-b --watch -- \
      --config configs/tpu/v4_32.py --workdir gs://YOUR_BUCKET/runs/v4_32
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'gpt2_124m.py'))
  c.data.data_dir = 'gs://YOUR_BUCKET/tensorflow_datasets'
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 24, 16, 2048  # about 1.3B
  c.model.remat = 'dots'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # fsdp over all 16 chips
  c.train.batch_size = 256
  c.train.eval_batch_size = 256
  c.checkpoint.every = 1000
  return c
