"""Character LSTM on tfds tiny_shakespeare, for comparison with the Transformer
(configs/shakespeare_char.py): 2 x 512, context 64, batch 32, Adam.

The hidden state is carried from step to step over 32 contiguous streams of the
text (truncated BPTT over 64 characters) and through the evaluation.
Offline: --config.data.manual_dir=DIR_WITH_INPUT_TXT.
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'shakespeare_char.py'))
  c.model.family = arg or 'lstm'
  c.model.num_layers = 2
  c.model.embed_dim = 512
  c.model.hidden_dim = 512
  c.model.tie_embeddings = False
  c.model.dropout = 0.0
  c.data.layout = 'stream'
  c.train.carry_state = True
  c.train.batch_size = 32
  c.train.eval_batch_size = 32
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 5.0
  return c
