"""Masked-LM pre-training (BERT-style) of a character-level encoder on tfds
tiny_shakespeare: 4 layers, 4 heads, width 128, context 128.

15 % of the characters are chosen (80 % become [MASK], 10 % a random
character, 10 % stay); loss and accuracy are those of the chosen positions.
Fine-tune the result with configs/classify.py (--config.init_from=WORKDIR).

tiny_shakespeare must be in the tfds data_dir, or buildable offline from a local
input.txt: --config.data.manual_dir=DIR_WITH_INPUT_TXT.
"""

from lmjax import config as config_lib


def encoder(c, tokenizer: str = 'chars'):
  """The encoder shared by this config and the classifiers fine-tuned from it."""
  c.model.family = 'encoder'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.positions = 'learned'
  c.data.seq_len = 128
  c.tokenizer.kind = tokenizer
  return c


def get_config(arg=None):
  del arg
  c = encoder(config_lib.base_config())
  c.task = 'mlm'
  c.data.name = 'tiny_shakespeare'
  c.data.text_key = 'text'
  c.data.layout = 'windows'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.min_learning_rate = 1e-4
  c.train.batch_size = 32
  c.train.num_steps = 5000
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_batches = -1  # The validation split is small.
  c.checkpoint.every = 1000
  c.sample.max_new_tokens = 0  # An encoder does not generate.
  return c
