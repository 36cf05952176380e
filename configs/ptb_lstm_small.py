"""Zaremba et al. (2014) PTB LSTM, small: 2 x 200, unroll 20, dropout 0.0, init ±0.1,
13 epochs, learning rate 1 decayed by 0.5 every epoch after epoch 4.
Paper (non-regularised): validation / test perplexity 120.7 / 114.5.

  python -m lmjax.train --config configs/ptb_lstm_small.py:/path/to/ptb --workdir runs/ptb_small
"""

import os

from lmjax import config as config_lib

_ptb = config_lib.import_file(os.path.join(os.path.dirname(__file__), '_ptb.py'), '_ptb')


def get_config(arg=None):
  return _ptb.ptb_config(
    arg, hidden=200, unroll=20, dropout=0.0, init_scale=0.1, epochs=13, decay_after=4, decay=0.5
  )
