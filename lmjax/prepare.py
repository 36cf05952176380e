"""Prepare a config's token stores ahead of training (lmjax.data.store).

    python -m lmjax.prepare --config configs/default.py [--config.*] \
        [--workdir DIR] [--splits train,validation,test] [--workers K] \
        [--num_shards N --shard_index I]

Each split is tokenized once into `data.store_shards` shards (with
data.layout='packed', also packed into rows of data.seq_len; with
task='classify', as a labelled store of (text, label) examples). `--workers K`
prepares this machine's shards in K processes; `--num_shards N --shard_index I`
makes this machine one of N preparing the same store (each run with its own
I, all pointing at one `data.cache_dir`, e.g. on gs://): each prepares the
shards s with s mod N = I, and the manifest is committed once all are there.
With `--workdir`, the run's tokenizer is used (and built and saved there if
the workdir has none), so `lmjax.train` on that workdir reuses the stores;
without it, the config's tokenizer is built the same way training builds it.
"""

import json
import multiprocessing
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

from lmjax import config as config_lib
from lmjax import fs
from lmjax import tasks
from lmjax import validation
from lmjax.data import corpora
from lmjax.data import store
from lmjax.data import tokenizers


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _prepare_share(job: tuple) -> dict:
  """One worker: this share of one split's shards (run in a spawned process)."""
  config_json, tokenizer_json, split, share, threads = job
  config = config_lib.from_json(config_json)
  tokenizer = tokenizers.from_json(tokenizer_json)
  tokenizer.threads = threads  # sentencepiece's own threads (other kinds have none)
  started = time.perf_counter()
  summary = tasks.get(config.task).prepare(config, tokenizer, split, share, _log)
  summary['seconds'] = round(time.perf_counter() - started, 2)
  return summary


def prepare(
  config,
  workdir: str = '',
  splits=None,
  workers: int = 1,
  machine=(0, 1),
  threads: int = 0,
  verify: bool = False,
) -> list:
  """Prepares (or finds) the stores of `splits` (default: the train and eval
  splits); returns one summary per split. Each of the `workers` processes
  tokenizes with `threads` threads (0: the cores shared out between them)."""
  threads = threads or max(1, (os.cpu_count() or 1) // workers)
  validation.check(config)
  workdir = workdir or tempfile.mkdtemp(prefix='lmjax-prepare-')
  fs.makedirs(workdir)
  train_texts = lambda: tasks.get(config.task).train_texts(config)
  tokenizer = tokenizers.for_run(config.tokenizer, workdir, train_texts)
  splits = splits or [config.data.train_split, config.data.eval_split]
  index, count = machine
  summaries = []
  for split in splits:
    shares = [(index * workers + w, count * workers) for w in range(workers)]
    jobs = [(config_lib.to_json(config), tokenizer.to_json(), split, s, threads) for s in shares]
    if workers == 1:
      results = [_prepare_share(jobs[0])]
    else:
      with multiprocessing.get_context('spawn').Pool(workers) as pool:
        results = pool.map(_prepare_share, jobs)
    summary = dict(results[0], prepared=any(r['prepared'] for r in results))
    if verify:  # every file hashed, whatever its modification time says
      for path in (summary['path'], summary.get('packed_path')):
        if path:
          store.verify(path, store.read_manifest(path), every_checksum=True)
    summary['seconds'] = max(r['seconds'] for r in results)
    summary['tokens_per_sec'] = round(summary['tokens'] / max(summary['seconds'], 1e-9))
    _log(
      f'{split}: {"prepared" if summary["prepared"] else "reused"} {summary["tokens"]:,} '
      f'tokens in {summary["documents"]:,} documents at {summary["path"]}'
    )
    summaries.append(summary)
  return summaries


def _main(argv):
  del argv
  values = flags.FLAGS
  splits = [s for s in values.splits.split(',') if s] or None
  try:
    summaries = prepare(
      values.config,
      values.workdir,
      splits,
      values.workers,
      (values.shard_index, values.num_shards),
      values.threads_per_worker,
      values.verify,
    )
  except (config_lib.ConfigError, corpora.CorpusError, ValueError, OSError) as error:
    sys.exit(f'error: {error}')
  print(json.dumps(summaries, indent=2))


def run():
  config_lib.define_config_flag()
  flags.DEFINE_string('workdir', '', "The run's workdir (its tokenizer is used, or saved there).")
  flags.DEFINE_string('splits', '', "Comma-separated splits ('' = the train and eval splits).")
  flags.DEFINE_integer('workers', 1, "Local processes preparing this machine's shards.")
  flags.DEFINE_integer(
    'threads_per_worker', 0, 'sentencepiece threads per worker (0 = the cores shared out).'
  )
  flags.DEFINE_bool('verify', False, 'Hash every file of every store (not only changed ones).')
  flags.DEFINE_integer('num_shards', 1, 'Machines preparing the same store.')
  flags.DEFINE_integer('shard_index', 0, 'This machine (0 .. num_shards - 1).')
  flags.mark_flags_as_required(['config'])
  flags.register_validator(
    'workers', lambda value: value >= 1, message='--workers must be at least 1'
  )
  app.run(_main)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
