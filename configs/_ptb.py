"""Shared settings of the Zaremba, Sutskever & Vinyals (2014) PTB word-level LSTMs.

"Recurrent Neural Network Regularization", arXiv:1409.2329, and its reference
implementation (the TensorFlow PTB tutorial): a 10,000-word vocabulary, 2 LSTM
layers, batch 20, plain SGD at learning rate 1 on the loss summed over the
unrolled steps and averaged over the batch, gradients clipped to global norm 5,
the learning rate held for a few epochs and then decayed every epoch; the hidden
state is carried from batch to batch (truncated BPTT) and evaluation runs over
the whole split as one carried stream.

The PTB files are not part of lmjax. Give their directory as the config
argument (default `data/ptb`): it must hold ptb.train.txt, ptb.valid.txt and
ptb.test.txt (one sentence per line; `<eos>` is appended to every line).
"""

import os

from lmjax import config as config_lib


def ptb_config(arg, *, hidden, unroll, dropout, init_scale, epochs, decay_after, decay):
  directory = arg or 'data/ptb'
  c = config_lib.base_config()
  c.data.name = 'files'
  c.data.files = os.path.join(directory, 'ptb.train.txt')
  c.data.validation_files = os.path.join(directory, 'ptb.valid.txt')
  c.data.test_files = os.path.join(directory, 'ptb.test.txt')
  c.data.append_eos = False  # The word tokenizer already ends every line with <eos>.
  c.data.layout = 'stream'
  c.data.seq_len = unroll
  c.tokenizer.kind = 'words'
  c.tokenizer.word_split = 'whitespace'  # PTB is pre-tokenized: its own 10k vocabulary.
  c.model.family = 'lstm'
  c.model.num_layers = 2
  c.model.embed_dim = hidden
  c.model.hidden_dim = hidden
  c.model.dropout = dropout
  c.model.init_scale = init_scale
  c.model.tie_embeddings = False
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.learning_rate = 1.0
  c.optimizer.schedule = 'epochs'
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_after_epochs = decay_after
  c.optimizer.decay_factor = decay
  c.optimizer.grad_clip = 5.0
  c.train.batch_size = 20
  c.train.num_epochs = epochs
  c.train.carry_state = True
  c.train.loss_normalization = 'rows'
  c.train.log_every = 200
  c.train.eval_every = 0  # only the final evaluation over the whole validation split
  c.train.eval_batches = -1
  c.train.final_eval_batches = -1
  c.train.eval_batch_size = 20
  c.checkpoint.every = 2000
  c.sample.prompt = 'the'
  c.sample.max_new_tokens = 40
  c.sample.top_k = 0
  c.sample.temperature = 1.0
  return c
