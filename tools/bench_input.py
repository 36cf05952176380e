#!/usr/bin/env python
"""Input-pipeline benchmark: prints one JSON line.

    python tools/bench_input.py --config configs/shakespeare_char.py [--batches 500] \
        [--config.data.manual_dir=DIR ...]

Measures the two stages of lmjax.data.pipeline on the configured corpus and
tokenizer: opening the training split's token store (preparing it first when
it is missing: `store_prepared`), and producing training batches from it
(every step) by random access, in tokens per second; and the ratio of the
latter to the train step's consumption when `--step_ms` (from tools/bench.py)
is given.
"""

import json
import tempfile
import time

from absl import app
from absl import flags

from lmjax import config as config_lib

flags.DEFINE_integer('batches', 500, 'Training batches to time.')
flags.DEFINE_float('step_ms', 0.0, 'Train step time (ms) to compare against (0 = none).')


def main(argv):
  del argv
  from lmjax.data import pipeline
  from lmjax.data import tokenizers

  config = flags.FLAGS.config
  data = config.data
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    tokenizer = tokenizers.for_run(
      config.tokenizer, workdir, lambda: pipeline.texts(data, data.train_split)
    )
    tokenizer_s = time.perf_counter() - start
  messages = []
  start = time.perf_counter()
  stream = pipeline.stored_split(data, tokenizer, data.train_split, messages.append)
  open_s = time.perf_counter() - start
  batches = pipeline.train_batches(
    stream, data.seq_len, config.train.batch_size, config.seed, layout=data.layout
  )
  next(batches)  # Starts the producer thread.
  start = time.perf_counter()
  for _ in range(flags.FLAGS.batches):
    next(batches)
  batches_s = time.perf_counter() - start
  tokens_per_batch = config.train.batch_size * data.seq_len
  batch_tokens_per_sec = flags.FLAGS.batches * tokens_per_batch / batches_s
  result = {
    'corpus': data.name,
    'tokenizer': tokenizer.kind,
    'vocab_size': tokenizer.vocab_size,
    'train_tokens': int(len(stream.tokens)),
    'tokenizer_build_s': tokenizer_s,
    'store_prepared': any('token store prepared' in m for m in messages),
    'store_open_s': open_s,
    'store_tokens_per_sec': len(stream.tokens) / open_s,
    'batch_tokens_per_sec': batch_tokens_per_sec,
    'batch_ms': 1e3 * batches_s / flags.FLAGS.batches,
  }
  if flags.FLAGS.step_ms:
    step_tokens_per_sec = tokens_per_batch / (flags.FLAGS.step_ms / 1e3)
    result['train_step_tokens_per_sec'] = step_tokens_per_sec
    result['input_over_step'] = batch_tokens_per_sec / step_tokens_per_sec
  print(json.dumps(result))


if __name__ == '__main__':
  config_lib.define_config_flag('configs/default.py')
  app.run(main)
