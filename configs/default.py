"""Default run: a byte-level Transformer on the embedded Python-stdlib corpus.

Needs no download: the corpus is the installed Python standard library's
sources, built once into the tfds data_dir. A few minutes on a 2-core CPU.

  python -m lmjax.train --config configs/default.py --workdir /tmp/lmjax_default
"""

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.name = 'python_stdlib'
  c.data.seq_len = 128
  c.tokenizer.kind = 'bytes'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.positions = 'rope'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.min_learning_rate = 2e-4
  c.train.batch_size = 16
  c.train.num_steps = 1200
  c.train.log_every = 100
  c.train.eval_every = 400
  c.train.eval_batches = 20
  c.train.final_eval_batches = 60
  c.checkpoint.every = 400
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 300
  return c
