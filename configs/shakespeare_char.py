"""nanoGPT's CPU "baby" Shakespeare run, on tfds tiny_shakespeare, characters.

4 layers, 4 heads, width 128, context 64, batch 12, 2,000 steps, AdamW lr 1e-3
(beta2 0.99), warm-up 100, cosine to 1e-4, dropout 0, weight decay 0.1, clip 1.
nanoGPT reaches validation loss about 1.88 with it.

tiny_shakespeare must be in the tfds data_dir, or buildable offline from a local
input.txt: --config.data.manual_dir=DIR_WITH_INPUT_TXT.
"""

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.name = 'tiny_shakespeare'
  c.data.text_key = 'text'
  c.data.seq_len = 64
  c.tokenizer.kind = 'chars'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.positions = 'learned'
  c.model.dropout = 0.0
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b2 = 0.99
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = 'cosine'
  c.optimizer.min_learning_rate = 1e-4
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0
  c.train.batch_size = 12
  c.train.num_steps = 2000
  c.train.log_every = 100
  c.train.eval_every = 250
  c.train.eval_batches = -1  # The validation split is small: evaluate all of it.
  c.train.eval_batch_size = 64
  c.checkpoint.every = 1000
  c.sample.prompt = 'ROMEO:'
  c.sample.max_new_tokens = 300
  return c
