"""Summarization (task='seq2seq'): `--config configs/summarize.py:SOURCE[,FAMILY]`,
SOURCE one of

  files          local JSONL/CSV/TSV pairs: --config.data.files=train.jsonl
                 --config.data.validation_files=valid.jsonl (fields data.source_key
                 and data.target_key, default 'source' and 'target'). The defaults
                 learn a small extractive task in a few minutes on 2 CPU cores
                 (tools/synthetic_pairs.py writes one: the target is the source's
                 second sentence).
  cnn_dailymail  tfds cnn_dailymail (article -> highlights; lead-3 is the baseline)
  xsum           tfds xsum (document -> summary)

and FAMILY (default 'transformer') one of 'transformer' (decoder-only:
`source SEP target EOS`, the loss on the target), 'encoder_decoder' (T5/BART
style), 'lstm', 'gru' or 'rnn' (decoder-only, one pair per row).

The tfds corpora are not downloaded at run time: prepare them once where the
network is, e.g. `python -c "import tensorflow_datasets as tfds;
tfds.builder('cnn_dailymail').download_and_prepare()"` (xsum needs its
archive placed in the manual dir first: --config.data.manual_dir), then copy the
data_dir (~/tensorflow_datasets, or --config.data.data_dir) to the training
machine. `python -m lmjax.evaluate --workdir WORKDIR [--eval_examples N]`
reports the target loss and perplexity and ROUGE-1/2/L/Lsum (rouge-score), with
the lead-3 baseline's beside them.
"""

from lmjax import config as config_lib

SOURCES = {  # name: (tfds name, source feature, target feature, evaluation split)
  'files': ('files', 'source', 'target', 'validation'),
  'cnn_dailymail': ('cnn_dailymail', 'article', 'highlights', 'validation'),
  'xsum': ('xsum', 'document', 'summary', 'validation'),
}
FAMILIES = ('transformer', 'encoder_decoder', 'lstm', 'gru', 'rnn')


def get_config(arg='files'):
  source, _, family = arg.partition(',')
  family = family or 'transformer'
  if source not in SOURCES or family not in FAMILIES:
    raise config_lib.ConfigError(
      f'configs/summarize.py:{arg}: use SOURCE[,FAMILY], SOURCE one of '
      f'{", ".join(SOURCES)}, FAMILY one of {", ".join(FAMILIES)}'
    )
  name, source_key, target_key, eval_split = SOURCES[source]
  c = config_lib.base_config()
  c.task = 'seq2seq'
  c.data.name = name
  c.data.source_key, c.data.target_key = source_key, target_key
  c.data.eval_split = eval_split
  c.model.family = family
  c.sample.max_new_tokens = 0
  c.train.eval_batches = -1
  if source == 'files':  # small: learns the synthetic task in minutes on a CPU
    c.tokenizer.kind = 'words'
    c.tokenizer.word_split = 'punctuation'
    c.data.seq_len = 64
    c.seq2seq.max_target_tokens = 16
    c.seq2seq.eval_examples = 200
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.embed_dim = 128
    # Learned positions: copying needs absolute ones (measured on the synthetic
    # task, 1000 steps: decoder-only ROUGE-L 92.9 against 72.8 with RoPE; the
    # encoder-decoder 100.0 against 11.7, its cross-attention seeing no position).
    c.model.positions = 'learned'
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.min_learning_rate = 1e-4
    c.optimizer.weight_decay = 0.01
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 500
    c.checkpoint.every = 500
    if family in ('lstm', 'gru', 'rnn'):
      c.model.num_layers = 2
      c.model.embed_dim = 256
    return c
  # News: a sentencepiece vocabulary and a longer context (a TPU or GPU job).
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.vocab_size = 16384
  c.data.seq_len = 1024 if source == 'cnn_dailymail' else 512
  c.seq2seq.max_target_tokens = 128 if source == 'cnn_dailymail' else 64
  c.seq2seq.beam_size = 4
  c.seq2seq.length_penalty = 0.6
  c.seq2seq.eval_examples = 1000
  c.model.num_layers = 6
  c.model.num_heads = 8
  c.model.embed_dim = 512
  # RoPE for a long decoder-only context; an encoder-decoder's cross-attention
  # needs the absolute positions learned ones give (see the files variant).
  c.model.positions = 'learned' if family == 'encoder_decoder' else 'rope'
  c.model.dtype = 'bfloat16'
  c.model.vocab_multiple = 128
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.min_learning_rate = 5e-5
  c.optimizer.weight_decay = 0.01
  c.train.batch_size = 64
  c.train.num_steps = 50_000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_batches = 50
  c.checkpoint.every = 2000
  if family == 'encoder_decoder':
    c.seq2seq.target_len = c.seq2seq.max_target_tokens + 1
  return c
