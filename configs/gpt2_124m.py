"""GPT-2 small (124M) shape: 12 layers, 12 heads, width 768, context 1024, a
50,304-entry sentencepiece vocabulary (50,257 rounded up to a multiple of 64),
on a named tfds corpus (lm1b). For pods; on CPU, use it to check memory:

  python -m lmjax.train --config configs/gpt2_124m.py --compile_only \
      --config.mesh.data=1 --config.mesh.fsdp=8
"""

from lmjax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.name = 'lm1b'
  c.data.seq_len = 1024
  c.data.layout = 'packed'  # lm1b is one sentence per example
  c.tokenizer.kind = 'sentencepiece'
  c.tokenizer.vocab_size = 50_304
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.embed_dim = 768
  c.model.positions = 'learned'
  c.model.vocab_multiple = 128
  c.model.dtype = 'bfloat16'
  # Scanned blocks keep every intermediate of every layer for the backward pass
  # unless told otherwise: without it the step needs 30 GiB a v5e chip (v5e:2x2,
  # batch 64), with it 11.3 GiB (the projections kept, attention recomputed).
  c.model.remat = 'dots'
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.min_learning_rate = 6e-5
  c.optimizer.b2 = 0.95
  c.train.batch_size = 64
  c.train.num_steps = 100_000
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.train.eval_batch_size = 64
  c.checkpoint.every = 2000
  return c
