"""Character Elman RNN (tanh) on tfds tiny_shakespeare: the LSTM config
(configs/shakespeare_char_lstm.py) with the cell swapped; 2 x 512, context 64,
batch 32, Adam.
"""

import os

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load_config_file(
    os.path.join(os.path.dirname(__file__), 'shakespeare_char_lstm.py') + ':rnn'
  )
  c.optimizer.learning_rate = 1e-3
  return c
