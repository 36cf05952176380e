#!/usr/bin/env python
"""Token-store benchmark: start-up time and memory against corpus size. Prints
one JSON line per measurement.

    python tools/bench_store.py --sizes_mb 32,128,512,2048 --dir /tmp/bench_store \
        [--train_steps 20] [--sentencepiece_mb 32]

For each size it writes a corpus of shuffled tiny-shakespeare lines (1 MB
files), then, each in a fresh process so that peak RSS is its own:
  * prepares the training split's store with the bytes tokenizer
    (`lmjax.prepare`): seconds, tokens/s, peak RSS;
  * runs a 20-step `lmjax.train` of configs/default.py's model on that store:
    wall seconds and peak RSS.
With `--layout packed` every line is a document and preparation also packs
the rows (measured together). On the `--sentencepiece_mb` corpus it also
compares sentencepiece preparation with 1 and 2 workers against
sentencepiece's own `encode` on the same text.
"""

import json
import os
import random
import sys
import time

import child_rss  # tools/child_rss.py, beside this script
from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare', 'input.txt')

flags.DEFINE_string('sizes_mb', '32,128,512,2048', 'Corpus sizes (MB of text).')
flags.DEFINE_string('dir', '/tmp/lmjax_bench_store', 'Where corpora, stores and runs go.')
flags.DEFINE_integer('train_steps', 20, 'Steps of each training run.')
flags.DEFINE_integer('sentencepiece_mb', 32, 'Corpus for the sentencepiece comparison (0 = skip).')
flags.DEFINE_string('source', SHAKESPEARE, 'Text whose lines are shuffled into the corpora.')
flags.DEFINE_enum(
  'layout',
  'windows',
  ['windows', 'packed'],
  "data.layout: 'packed' makes every line a document, packed into rows at preparation.",
)


def make_corpus(directory: str, size_mb: int, source: str) -> str:
  """`size_mb` MB of the source's lines, shuffled, in 1 MB files (kept if present)."""
  os.makedirs(directory, exist_ok=True)
  marker = os.path.join(directory, 'DONE')
  if os.path.exists(marker):
    return directory
  with open(source, encoding='utf-8') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rng = random.Random(size_mb)
  for index in range(size_mb):
    chunk, size = [], 0
    while size < 1 << 20:
      line = lines[rng.randrange(len(lines))]
      chunk.append(line)
      size += len(line) + 1
    with open(os.path.join(directory, f'part-{index:05d}.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(chunk) + '\n')
  open(marker, 'w').close()
  return directory


def corpus_flags(corpus: str, stores: str, tokenizer: str = 'bytes') -> list:
  return [
    '--config',
    'configs/default.py',
    '--config.data.name=files',
    f'--config.data.files={corpus}/part-*.txt',
    '--config.data.validation_fraction=0.01',
    f'--config.data.cache_dir={stores}',
    f'--config.tokenizer.kind={tokenizer}',
    f'--config.data.layout={flags.FLAGS.layout}',
    f'--config.data.documents={"lines" if flags.FLAGS.layout == "packed" else ""}',
  ]


def prepare(
  corpus: str, stores: str, tokenizer: str, workers: int = 1, workdir: str = '', threads: int = 0
) -> dict:
  command = [sys.executable, '-m', 'lmjax.prepare', *corpus_flags(corpus, stores, tokenizer)]
  command += ['--splits=train', f'--workers={workers}', f'--threads_per_worker={threads}']
  if workdir:
    command += [f'--workdir={workdir}']
  result = child_rss.measured(command)
  summary = json.loads(result['stdout'][result['stdout'].index('[') :])[0]
  return {
    'seconds': result['seconds'],
    'peak_rss_gb': result['peak_rss_gb'],
    'tokens': summary['tokens'],
    'tokens_per_sec': round(summary['tokens'] / summary['seconds']),
    'prepare_seconds': summary['seconds'],
    **({'packed_rows': summary['packed_rows']} if 'packed_rows' in summary else {}),
  }


def train(corpus: str, stores: str, workdir: str, steps: int) -> dict:
  command = [sys.executable, '-m', 'lmjax.train', *corpus_flags(corpus, stores)]
  command += [
    f'--workdir={workdir}',
    f'--config.train.num_steps={steps}',
    '--config.train.eval_every=0',
    '--config.train.final_eval_batches=2',
    '--config.sample.max_new_tokens=0',
    '--config.compilation_cache_dir=',
  ]
  result = child_rss.measured(command)
  return {'seconds': result['seconds'], 'peak_rss_gb': result['peak_rss_gb']}


def sentencepiece_comparison(corpus: str, stores: str, directory: str) -> dict:
  """Store preparation against sentencepiece's own encode of the same text on
  one thread, and 2 single-threaded workers against one."""
  workdir = os.path.join(directory, 'sentencepiece_tokenizer')
  first = prepare(corpus, os.path.join(stores, 'sp1'), 'sentencepiece', 1, workdir, threads=1)
  second = prepare(corpus, os.path.join(stores, 'sp2'), 'sentencepiece', 2, workdir, threads=1)
  import sentencepiece

  texts = []
  for name in sorted(os.listdir(corpus)):
    if name.endswith('.txt'):
      with open(os.path.join(corpus, name), encoding='utf-8') as f:
        texts.append(f.read())
  processor = sentencepiece.SentencePieceProcessor(
    model_file=os.path.join(workdir, 'tokenizer.model')
  )
  start = time.perf_counter()
  tokens = sum(len(ids) for ids in processor.encode(texts, num_threads=1))
  encode_s = time.perf_counter() - start
  native = tokens / encode_s
  return {
    'native_encode_tokens_per_sec': round(native),
    'prepare_1_worker_tokens_per_sec': first['tokens_per_sec'],
    'prepare_2_workers_tokens_per_sec': second['tokens_per_sec'],
    'prepare_over_native': round(first['tokens_per_sec'] / native, 3),
    'two_workers_over_one': round(second['tokens_per_sec'] / first['tokens_per_sec'], 3),
    'prepare_1_worker_peak_rss_gb': first['peak_rss_gb'],
  }


def main(argv):
  del argv
  directory = flags.FLAGS.dir
  for size in [int(s) for s in flags.FLAGS.sizes_mb.split(',') if s]:
    corpus = make_corpus(os.path.join(directory, f'corpus_{size}mb'), size, flags.FLAGS.source)
    stores = os.path.join(directory, f'stores_{size}mb_{time.time_ns()}')  # prepared afresh
    prepared = prepare(corpus, stores, 'bytes')
    trained = train(
      corpus,
      stores,
      os.path.join(directory, f'run_{size}mb_{time.time_ns()}'),
      flags.FLAGS.train_steps,
    )
    record = {'corpus_mb': size, 'layout': flags.FLAGS.layout}
    print(json.dumps({**record, 'prepare_bytes': prepared, 'train': trained}), flush=True)
  if flags.FLAGS.sentencepiece_mb:
    size = flags.FLAGS.sentencepiece_mb
    corpus = make_corpus(os.path.join(directory, f'corpus_{size}mb'), size, flags.FLAGS.source)
    stores = os.path.join(directory, f'stores_{size}mb_sp_{time.time_ns()}')
    print(
      json.dumps(
        {'corpus_mb': size, 'sentencepiece': sentencepiece_comparison(corpus, stores, directory)}
      ),
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
