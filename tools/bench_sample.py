#!/usr/bin/env python
"""Generation benchmark: prints one JSON line.

    python tools/bench_sample.py [--config configs/default.py] [--new_tokens 256] \
        [--batch 1] [--workdir RUN]   # a trained run's checkpoint, else random parameters

Times `lmjax.sample.generate` for the configured model with the key/value cache
(one token per step) and without it (every token recomputes the model over the
last context window), after a warm-up call of each (compilation excluded), and
prints generated tokens per second for both and their ratio.
"""

import json
import time

from absl import app
from absl import flags

from lmjax import config as config_lib

flags.DEFINE_integer('new_tokens', 256, 'Tokens to generate.')
flags.DEFINE_integer('batch', 1, 'Rows generated at once.')
flags.DEFINE_integer('prompt_len', 8, 'Prompt tokens.')
flags.DEFINE_string('workdir', '', "Use this run's latest checkpoint instead of random parameters.")


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lmjax import cpu_host
  from lmjax import evaluate
  from lmjax import models
  from lmjax import sample

  cpu_host.prepare()  # as lmjax.sample does
  if flags.FLAGS.workdir:
    restored = evaluate.restore_for_inference(flags.FLAGS.workdir)
    config, model, params = restored.config, restored.model, restored.params
    vocab = restored.tokenizer.vocab_size
  else:
    config = flags.FLAGS.config
    vocab = 257 if config.tokenizer.kind == 'bytes' else config.tokenizer.vocab_size
    model = models.build_model(config.model, vocab, config.data.seq_len)
    params = nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, config.data.seq_len), jnp.int32))['params']
    )
  prompt = np.random.default_rng(0).integers(0, vocab, flags.FLAGS.prompt_len).astype(np.int32)
  result = {
    'model': config.model.family,
    'layers': config.model.num_layers,
    'width': config.model.embed_dim,
    'context': config.data.seq_len,
    'positions': config.model.positions,
    'batch': flags.FLAGS.batch,
    'new_tokens': flags.FLAGS.new_tokens,
    'prompt_len': flags.FLAGS.prompt_len,
  }
  for name, use_cache in (('cache', True), ('recompute', False)):
    run = lambda use_cache=use_cache: sample.generate(
      params,
      model,
      prompt,
      flags.FLAGS.new_tokens,
      vocab_size=vocab,
      temperature=0.8,
      top_k=40,
      num_samples=flags.FLAGS.batch,
      use_cache=use_cache,
    )
    run()  # compile
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    result[f'{name}_tokens_per_sec'] = flags.FLAGS.batch * flags.FLAGS.new_tokens / seconds
    result[f'{name}_s'] = seconds
  result['speedup'] = result['cache_tokens_per_sec'] / result['recompute_tokens_per_sec']
  print(json.dumps(result))


if __name__ == '__main__':
  config_lib.define_config_flag('configs/default.py')
  app.run(main)
