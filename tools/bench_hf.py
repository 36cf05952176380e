#!/usr/bin/env python
"""Hugging Face import / export benchmark: time and peak memory. Prints one JSON line.

    python tools/bench_hf.py [--dir /tmp/lmjax_bench_hf] [--n_layer 12 --n_embd 768 --n_head 12]

Builds a randomly initialised GPT-2 of the given shape (the defaults are
GPT-2 124M's: 12 layers, 768 wide, 50,257 tokens, 1,024 positions) with
transformers from its config, with a byte-level BPE tokenizer trained on
tiny-shakespeare, and saves it (safetensors); then, each in a fresh process
so that its peak RSS is its own, runs `python -m lmjax.hf import` and
`python -m lmjax.hf export`, and reports their wall time and peak RSS beside
the model's float32 size. No real GPT-2 is downloaded (no network).
"""

import json
import os
import subprocess
import sys

import child_rss  # tools/child_rss.py, beside this script
from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare', 'input.txt')

flags.DEFINE_string('dir', '/tmp/lmjax_bench_hf', 'Where the model, run and export go.')
flags.DEFINE_integer('n_layer', 12, 'GPT-2 layers.')
flags.DEFINE_integer('n_embd', 768, 'GPT-2 width.')
flags.DEFINE_integer('n_head', 12, 'GPT-2 heads.')
flags.DEFINE_integer('vocab_size', 50257, 'GPT-2 vocabulary (embedding rows).')


def make_model(directory: str) -> dict:
  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import pre_tokenizers
  from tokenizers import trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=4096,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  with open(SHAKESPEARE, encoding='utf-8') as f:
    tok.train_from_iterator(f.read().splitlines(), trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>')
  fast.save_pretrained(directory)
  values = flags.FLAGS
  config = transformers.GPT2Config(
    vocab_size=values.vocab_size,
    n_layer=values.n_layer,
    n_embd=values.n_embd,
    n_head=values.n_head,
    eos_token_id=fast.eos_token_id,
    bos_token_id=fast.eos_token_id,
  )
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(directory)
  count = sum(p.numel() for p in model.parameters())
  return {'parameters': count, 'float32_gb': round(count * 4 / 2**30, 3)}


def measured(command: list) -> dict:
  result = child_rss.measured(command)
  return {'seconds': result['seconds'], 'peak_rss_gb': result['peak_rss_gb']}


def main(argv):
  del argv
  directory = flags.FLAGS.dir
  hf_dir, run, out = (os.path.join(directory, name) for name in ('hf', 'run', 'export'))
  subprocess.run(['rm', '-rf', run, out], check=True)
  model = make_model(hf_dir)
  python = [sys.executable, '-m', 'lmjax.hf']
  imported = measured(python + ['import', f'--hf_dir={hf_dir}', f'--workdir={run}'])
  exported = measured(python + ['export', f'--workdir={run}', f'--hf_dir={out}'])
  baseline = measured([sys.executable, '-c', 'import jax, tensorflow, transformers'])
  print(
    json.dumps(
      {
        'model': 'gpt2 (random, from config)',
        **model,
        'import': imported,
        'export': exported,
        'python_imports_alone': baseline,
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
