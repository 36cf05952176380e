"""Zaremba et al. (2014) PTB LSTM, large: 2 x 1500, unroll 35, dropout 0.65, init ±0.04,
55 epochs, learning rate 1 decayed by 1/1.15 every epoch after epoch 14.
Paper: validation / test perplexity 82.2 / 78.4.

  python -m lmjax.train --config configs/ptb_lstm_large.py:/path/to/ptb --workdir runs/ptb_large
"""

import os

from lmjax import config as config_lib

_ptb = config_lib.import_file(os.path.join(os.path.dirname(__file__), '_ptb.py'), '_ptb')


def get_config(arg=None):
  return _ptb.ptb_config(
    arg,
    hidden=1500,
    unroll=35,
    dropout=0.65,
    init_scale=0.04,
    epochs=55,
    decay_after=14,
    decay=1 / 1.15,
  )
