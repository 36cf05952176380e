"""Text corpora as tf.data datasets of documents (scalar tf.string).

Three sources, one interface (`documents(data_config, split)`):
  * `python_stdlib`: the embedded default corpus, a real TFDS dataset built
    from the installed Python standard library's `.py` sources (no download);
  * any named tfds text corpus (`tiny_shakespeare`, `lm1b`, ...), read from the
    tfds data_dir and, when given `manual_dir`, built offline from local files;
  * `files`: the user's own UTF-8 text files by glob, one document per file.
"""

import glob
import hashlib
import os
import sys
import sysconfig
from typing import Any

try:  # tfds 4.9 imports importlib_resources without declaring it (Python >= 3.9).
  import importlib_resources  # noqa: F401
except ImportError:  # pragma: no cover - the dependency is declared in pyproject.
  import importlib.resources
  import importlib.resources.abc  # noqa: F401

  sys.modules['importlib_resources'] = importlib.resources

import tensorflow as tf
import tensorflow_datasets as tfds

from lmjax import locks
from lmjax.data import cleaning

# tf.data only feeds the host: keep TensorFlow off the accelerators JAX uses.
for _kind in ('GPU', 'TPU'):
  if tf.config.list_physical_devices(_kind):
    tf.config.set_visible_devices([], _kind)


class CorpusError(ValueError):
  """A corpus that cannot be read: missing, empty, binary or not UTF-8."""


# ----------------------------------------------------------------------------
# The embedded corpus.

_STDLIB_SKIP_DIRS = frozenset(
  {
    '__pycache__',
    'site-packages',
    'dist-packages',
    'test',
    'tests',
    'idlelib',
    'lib2to3',
    'turtledemo',
    'ensurepip',
    'pydoc_data',
    'tkinter',
  }
)
_SPLIT_FRACTIONS = (('validation', 0.05), ('test', 0.05))  # The rest is train.


def split_of(key: str) -> str:
  """Deterministic split of a document id: stable across runs and machines."""
  bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') / 2.0**64
  for name, fraction in _SPLIT_FRACTIONS:
    if bucket < fraction:
      return name
    bucket -= fraction
  return 'train'


def stdlib_sources() -> list[tuple[str, str]]:
  """(relative path, absolute path) of the stdlib's .py files, sorted."""
  root = sysconfig.get_paths()['stdlib']
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(
      d for d in subdirs if d not in _STDLIB_SKIP_DIRS and not d.startswith('config-')
    )
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        found.append((os.path.relpath(path, root), path))
  return sorted(found)


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The installed Python standard library's sources, one document per file.

  Embedded in every Python installation, so lmjax's default run needs no
  download. Splits (train 90% / validation 5% / test 5%) are chosen by hashing
  each file's path relative to the stdlib root.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # One config per Python version: each has its own standard library.
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=f'py{sys.version_info.major}{sys.version_info.minor}',
      description=f'Standard library of Python {sys.version_info.major}.{sys.version_info.minor}',
    )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'text': tfds.features.Text(),
          'path': tfds.features.Text(),
        }
      ),
      homepage='https://docs.python.org/3/library/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    by_split = {'train': [], 'validation': [], 'test': []}
    for relative, path in stdlib_sources():
      by_split[split_of(relative)].append((relative, path))
    return {name: self._generate_examples(files) for name, files in by_split.items()}

  def _generate_examples(self, files):
    for relative, path in files:
      with open(path, 'rb') as f:
        raw = f.read()
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError:
        continue  # A handful of legacy-encoded files; not worth guessing.
      if text.strip():
        yield relative, {'text': text, 'path': relative}


# ----------------------------------------------------------------------------
# Named tfds corpora.


def _prepare(builder, data_config) -> None:
  """Builds a tfds corpus: from data.manual_dir if given, else by downloading."""
  name, manual_dir = data_config.name, data_config.manual_dir
  how_to = (
    'Prepare it on a machine with network access and copy the tfds data_dir, or put '
    'its source files in a directory and pass --config.data.manual_dir=DIR.'
  )
  if manual_dir and not os.path.isdir(manual_dir):
    raise CorpusError(
      f'tfds corpus {name!r} is not prepared in {builder.data_dir!r} and '
      f'data.manual_dir={manual_dir!r} is not a directory. {how_to}'
    )
  if not manual_dir and not data_config.download and not isinstance(builder, PythonStdlib):
    raise CorpusError(
      f'tfds corpus {name!r} is not prepared in {builder.data_dir!r} and '
      f'data.download is False. {how_to}'
    )
  download_config = tfds.download.DownloadConfig(
    manual_dir=manual_dir or None, try_download_gcs=False
  )
  # Processes of one job (or two runs) that find the corpus unprepared would
  # each build it and race on tfds's final rename: one builds, the others wait
  # and then read what it built.
  with locks.Lock(
    os.path.dirname(builder.data_dir),
    '.lmjax-prepare.lock',
    f'the build of tfds corpus {name!r}',
    wait=True,
  ):
    if builder.is_prepared():
      return
    try:
      builder.download_and_prepare(download_config=download_config)
    except Exception as error:  # tfds raises many kinds; say what to do.
      raise CorpusError(
        f'tfds corpus {name!r} is not prepared in {builder.data_dir!r} and '
        f'could not be built ({type(error).__name__}: {error}). {how_to}'
      ) from error


def tfds_examples(data_config, split: str, keys) -> tuple[tf.data.Dataset, Any]:
  """(the split's examples in order, the builder's features), the corpus prepared
  first if need be; CorpusError if a feature in `keys` does not exist."""
  data_dir = data_config.data_dir or None
  builder = tfds.builder(data_config.name, data_dir=data_dir)
  if not builder.is_prepared():
    _prepare(builder, data_config)
  features = builder.info.features
  for key in keys:
    if key not in features:
      raise CorpusError(
        f'tfds corpus {data_config.name!r} has no feature {key!r}; its '
        f'features: {", ".join(features)}'
      )
  dataset = tfds.load(
    data_config.name, split=split, data_dir=data_dir, download=False, shuffle_files=False
  )
  return dataset, features


def _tfds_documents(data_config, split: str) -> tf.data.Dataset:
  key = data_config.text_key
  dataset, _ = tfds_examples(data_config, split, [key])
  return dataset.map(
    lambda example: example[key], num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


# ----------------------------------------------------------------------------
# Local files.


def check_text_file(path: str, invalid_utf8: str = 'error') -> None:
  """Raises CorpusError if `path` is empty, binary, or (unless invalid_utf8 is
  'replace') not valid UTF-8."""
  with tf.io.gfile.GFile(path, 'rb') as f:  # local or gs://
    raw = f.read()
  if not raw.strip():
    raise CorpusError(f'{path}: file is empty (no text to train on)')
  nul = raw.find(b'\x00')
  if nul >= 0:
    raise CorpusError(f'{path}: looks binary (NUL byte at offset {nul}); expected UTF-8 text')
  if invalid_utf8 == 'replace':
    return
  try:
    raw.decode('utf-8')
  except UnicodeDecodeError as error:
    raise CorpusError(
      f'{path}: not valid UTF-8 (byte offset {error.start}: {error.reason}); '
      '--config.data.invalid_utf8=replace reads it anyway'
    ) from None


def glob_files(pattern: str) -> list[str]:
  """The files a glob matches, sorted: through tf.io.gfile for URLs (gs://...),
  Python's glob (with **) for local paths."""
  if '://' in pattern:
    return sorted(p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p))
  return sorted(
    p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )


def _glob(pattern: str, what: str) -> list[str]:
  paths = glob_files(pattern)
  if not paths:
    raise CorpusError(f'{what}={pattern!r} matched no file')
  return paths


LOCAL_SPLITS = ('train', 'validation', 'test')


def split_plan(data_config) -> dict:
  """{split: [(path, start, end)]}: which files, and which share of each
  (cut at line boundaries), make each split of a local corpus.

  A split with its own glob (data.validation_files, data.test_files) takes
  those files, and the training glob loses them. A split without one is carved
  out of the training files by its fraction: whole files chosen by hashing
  their names, or, with a single file, that file's last lines (test last,
  validation before it). Deterministic across runs and machines.
  """
  if not data_config.files:
    raise CorpusError("data.name='files' needs data.files, a glob of text files")
  own = {}
  for split in ('validation', 'test'):
    pattern = data_config[f'{split}_files']
    own[split] = _glob(pattern, f'data.{split}_files') if pattern else None
  taken = {p for paths in own.values() if paths for p in paths}
  train = [p for p in _glob(data_config.files, 'data.files') if p not in taken]
  if not train:
    raise CorpusError(f'data.files={data_config.files!r} matched only files that other splits take')
  fractions = {
    split: (0.0 if own[split] else float(data_config[f'{split}_fraction']))
    for split in ('validation', 'test')
  }
  plan = {
    split: [(p, 0.0, 1.0) for p in own[split]] if own[split] else []
    for split in ('validation', 'test')
  }
  if len(train) == 1 and any(fractions.values()):
    validation_start = 1.0 - fractions['validation'] - fractions['test']
    test_start = 1.0 - fractions['test']
    plan['train'] = [(train[0], 0.0, validation_start)]
    for split, start, end in (
      ('validation', validation_start, test_start),
      ('test', test_start, 1.0),
    ):
      if fractions[split]:
        plan[split] = [(train[0], start, end)]
  else:
    buckets = {p: _file_bucket(p) for p in train}
    plan['train'] = []
    low = 0.0
    for split in ('validation', 'test'):
      high = low + fractions[split]
      if fractions[split]:
        chosen = [p for p in train if low <= buckets[p] < high]
        if not chosen:  # A requested split always gets a file.
          chosen = [
            min((p for p in train if buckets[p] >= low), key=buckets.get, default=train[-1])
          ]
        plan[split] = [(p, 0.0, 1.0) for p in chosen]
      low = high
    held_out = {p for split in ('validation', 'test') if not own[split] for p, _, _ in plan[split]}
    plan['train'] = [(p, 0.0, 1.0) for p in train if p not in held_out]
    if not plan['train']:
      raise CorpusError(
        f'data.files={data_config.files!r}: every file went to validation or '
        'test; add files or lower data.validation_fraction/test_fraction'
      )
  return plan


def checked_parts(data_config, split: str) -> list[tuple[str, float, float]]:
  """`split_plan(data_config)[split]`, its files checked (empty, binary, UTF-8)."""
  if split not in LOCAL_SPLITS:
    raise CorpusError(f'local corpora have splits {", ".join(LOCAL_SPLITS)}; got {split!r}')
  if data_config.invalid_utf8 not in ('error', 'replace'):
    raise CorpusError(
      f"data.invalid_utf8 must be 'error' or 'replace', got {data_config.invalid_utf8!r}"
    )
  parts = split_plan(data_config)[split]
  if not parts:
    raise CorpusError(
      f'the local corpus has no {split!r} split: set data.{split}_files or data.{split}_fraction'
    )
  for path in dict.fromkeys(p for p, _, _ in parts):
    check_text_file(path, data_config.invalid_utf8)
  return parts


def local_files(data_config, split: str) -> list[str]:
  """The (checked) files that `split` of a local corpus reads."""
  return list(dict.fromkeys(p for p, _, _ in checked_parts(data_config, split)))


def _file_bucket(path: str) -> float:
  digest = hashlib.sha256(os.path.basename(path).encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def _line_cut(raw: bytes, fraction: float) -> int:
  """The first line boundary at or before `fraction` of `raw`."""
  if fraction <= 0.0:
    return 0
  if fraction >= 1.0:
    return len(raw)
  point = int(len(raw) * fraction)
  newline = raw.rfind(b'\n', 0, point)
  return newline + 1 if newline >= 0 else point


def _files_documents(data_config, split: str) -> tf.data.Dataset:
  parts = checked_parts(data_config, split)

  def read(path, start, end):
    def cut(raw: bytes, start: float, end: float) -> bytes:
      return raw[_line_cut(raw, float(start)) : _line_cut(raw, float(end))]

    text = tf.numpy_function(cut, [tf.io.read_file(path), start, end], tf.string, stateful=False)
    return tf.reshape(text, [])

  paths, starts, ends = zip(*parts)
  return tf.data.Dataset.from_tensor_slices((list(paths), list(starts), list(ends))).map(read)


DOCUMENT_UNITS = cleaning.DOCUMENT_UNITS


def documents(data_config, split: str) -> tf.data.Dataset:
  """A deterministic tf.data dataset of the split's documents (tf.string).

  `data.documents` cuts each record (a tfds example, a local file) further into
  paragraphs (blank-line separated) or lines; separators are dropped.
  """
  if data_config.documents not in DOCUMENT_UNITS:
    raise CorpusError(
      f'data.documents must be one of {sorted(DOCUMENT_UNITS)}; got {data_config.documents!r}'
    )
  if data_config.name == 'files':
    dataset = _files_documents(data_config, split)
  else:
    dataset = _tfds_documents(data_config, split)
  separator = DOCUMENT_UNITS[data_config.documents]
  if separator:
    dataset = dataset.flat_map(
      lambda text: tf.data.Dataset.from_tensor_slices(tf.strings.split(text, separator))
    )
  return dataset
