"""Zaremba et al. (2014) PTB LSTM, medium: 2 x 650, unroll 35, dropout 0.5, init ±0.05,
39 epochs, learning rate 1 decayed by 0.8 every epoch after epoch 6.
Paper: validation / test perplexity 86.2 / 82.7.

  python -m lmjax.train --config configs/ptb_lstm_medium.py:/path/to/ptb --workdir runs/ptb_medium
"""

import os

from lmjax import config as config_lib

_ptb = config_lib.import_file(os.path.join(os.path.dirname(__file__), '_ptb.py'), '_ptb')


def get_config(arg=None):
  return _ptb.ptb_config(
    arg, hidden=650, unroll=35, dropout=0.5, init_scale=0.05, epochs=39, decay_after=6, decay=0.8
  )
