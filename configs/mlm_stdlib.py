"""Masked-LM pre-training of a byte-level encoder on the embedded Python-stdlib
corpus (no download), packed by file so no window spans two files."""

import os

from lmjax import config as config_lib

shared = config_lib.import_file(
  os.path.join(os.path.dirname(__file__), 'mlm_shakespeare.py'), '_mlm_shakespeare'
)


def get_config(arg=None):
  del arg
  c = shared.encoder(config_lib.base_config(), tokenizer='bytes')
  c.task = 'mlm'
  c.data.name = 'python_stdlib'
  c.data.layout = 'packed'
  c.model.positions = 'rope'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_batches = 20
  c.checkpoint.every = 1000
  c.sample.max_new_tokens = 0
  return c
