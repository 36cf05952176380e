"""Corpora: the embedded tfds builder, a named tfds corpus built offline, local files."""

import pytest
import tensorflow_datasets as tfds

from conftest import SHAKESPEARE_DIR
from lmjax import config as config_lib
from lmjax.data import corpora
from lmjax.data import pipeline


def data_config(**fields):
  c = config_lib.base_config().data
  for key, value in fields.items():
    c[key] = value
  return c


@pytest.fixture(scope='module')
def stdlib_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_python_stdlib_builds_and_loads_through_tfds(stdlib_data_dir):
  builder = corpora.PythonStdlib(data_dir=stdlib_data_dir)
  builder.download_and_prepare()
  splits = builder.info.splits
  assert set(splits.keys()) == {'train', 'validation', 'test'}
  assert splits['train'].num_examples > 10 * splits['validation'].num_examples > 0
  # Read back through tfds.load like any other corpus.
  paths = {}
  for split in ('train', 'validation'):
    dataset = tfds.load('python_stdlib', split=split, data_dir=stdlib_data_dir)
    paths[split] = [ex['path'].decode() for ex in dataset.as_numpy_iterator()]
    assert all(corpora.split_of(p) == split for p in paths[split])
  assert not set(paths['train']) & set(paths['validation'])
  assert 'os.py' in paths['train'] + paths['validation']


def test_python_stdlib_documents_are_deterministic(stdlib_data_dir):
  config = data_config(name='python_stdlib', data_dir=stdlib_data_dir)
  first = list(pipeline.texts(config, 'validation'))
  second = list(pipeline.texts(config, 'validation'))
  assert first == second and len(first) > 5
  assert any('def ' in text for text in first)


def test_tiny_shakespeare_builds_offline_from_manual_dir(tmp_path):
  config = data_config(
    name='tiny_shakespeare', data_dir=str(tmp_path), manual_dir=str(SHAKESPEARE_DIR)
  )
  train = list(pipeline.texts(config, 'train'))
  validation = list(pipeline.texts(config, 'validation'))
  assert len(train) == 1 and len(validation) == 1
  assert train[0].startswith('First Citizen:')
  assert len(train[0]) + len(validation[0]) < 1_115_394


@pytest.mark.parametrize(
  'fields, message',
  [
    (
      {'manual_dir': '/nonexistent/sources'},
      "manual_dir='/nonexistent/sources' is not a directory",
    ),
    ({'download': False}, 'data.download is False'),
  ],
)
def test_unprepared_named_corpus_fails_at_once_saying_what_to_do(tmp_path, fields, message):
  config = data_config(name='tiny_shakespeare', data_dir=str(tmp_path), **fields)
  with pytest.raises(corpora.CorpusError, match=message) as error:
    list(pipeline.texts(config, 'train'))
  assert str(tmp_path) in str(error.value) and '--config.data.manual_dir' in str(error.value)


def test_files_glob_matching_nothing(tmp_path):
  config = data_config(name='files', files=str(tmp_path / '*.txt'))
  with pytest.raises(corpora.CorpusError, match=r"data.files=.*\*\.txt' matched no file"):
    list(pipeline.texts(config, 'train'))


@pytest.mark.parametrize(
  'content, message',
  [
    (b'', 'file is empty'),
    (b'   \n\n', 'file is empty'),
    (b'text\x00\x01\x02binary', r'looks binary \(NUL byte at offset 4\)'),
    (b'caf\xe9 au lait', r'not valid UTF-8 \(byte offset 3'),
  ],
)
def test_bad_files_name_the_file(tmp_path, content, message):
  (tmp_path / 'good.txt').write_text('fine text\n' * 10)
  (tmp_path / 'bad.txt').write_bytes(content)
  config = data_config(
    name='files', files=str(tmp_path / '*.txt'), validation_files=str(tmp_path / 'good.txt')
  )
  with pytest.raises(corpora.CorpusError, match=message) as error:
    list(pipeline.texts(config, 'train'))
  assert 'bad.txt' in str(error.value)


def test_single_file_is_split_at_a_line_boundary(tmp_path):
  lines = [f'line {i}' for i in range(100)]
  (tmp_path / 'one.txt').write_text('\n'.join(lines) + '\n')
  config = data_config(name='files', files=str(tmp_path / 'one.txt'), validation_fraction=0.1)
  train = ''.join(pipeline.texts(config, 'train'))
  held_out = ''.join(pipeline.texts(config, 'validation'))
  assert train + held_out == '\n'.join(lines) + '\n'
  assert held_out.startswith('line ') and 5 <= held_out.count('\n') <= 15


def test_many_files_are_split_by_file(corpus_dir):
  config = data_config(name='files', files=str(corpus_dir / '*.txt'))
  train = corpora.local_files(config, 'train')
  held_out = corpora.local_files(config, 'validation')
  assert held_out and train and not set(train) & set(held_out)
  assert len(train) + len(held_out) == 4


def test_cleaning_is_applied_to_every_document(tmp_path):
  (tmp_path / 'a.txt').write_text('Ｆｕｌｌ ｗｉｄｔｈ ﬁne\n\n\x07Bell AND Caps\n')
  (tmp_path / 'b.txt').write_text('tiny\n')
  (tmp_path / 'c.txt').write_text('held out text\n')
  config = data_config(
    name='files', files=str(tmp_path / '[ab].txt'), validation_files=str(tmp_path / 'c.txt')
  )
  config.clean.update(
    {
      'nfkc': True,
      'lowercase': True,
      'strip_control': True,
      'drop_empty_lines': True,
      'min_doc_chars': 6,
    }
  )
  assert list(pipeline.texts(config, 'train')) == ['full width fine\nbell and caps\n']
  from lmjax import sample
  from lmjax.data import tokenizers

  tokenizer = tokenizers.CharTokenizer.build(pipeline.texts(config, 'train'))
  ids = sample.encode_prompt(tokenizer, 'ＢＥＬＬ', config.clean)  # prompts are cleaned alike
  assert tokenizer.decode(ids[1:]) == 'bell'


def test_invalid_utf8_can_be_replaced_instead(tmp_path):
  (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9 au lait\n' * 3)
  (tmp_path / 'valid.txt').write_text('fine\n')
  config = data_config(
    name='files',
    files=str(tmp_path / 'latin1.txt'),
    validation_files=str(tmp_path / 'valid.txt'),
    invalid_utf8='replace',
  )
  assert list(pipeline.texts(config, 'train')) == ['caf\ufffd au lait\n' * 3]


def test_ptb_style_train_valid_test_globs(tmp_path):
  for split in ('train', 'valid', 'test'):
    (tmp_path / f'ptb.{split}.txt').write_text(f' a {split} sentence \n')
  config = data_config(
    name='files',
    files=str(tmp_path / 'ptb.*.txt'),
    validation_files=str(tmp_path / 'ptb.valid.txt'),
    test_files=str(tmp_path / 'ptb.test.txt'),
  )
  # The training glob matches all three; the other splits take theirs away from it.
  assert list(pipeline.texts(config, 'train')) == [' a train sentence \n']
  assert list(pipeline.texts(config, 'validation')) == [' a valid sentence \n']
  assert list(pipeline.texts(config, 'test')) == [' a test sentence \n']


def test_one_file_is_carved_into_three_splits_at_line_boundaries(tmp_path):
  lines = [f'line {i}\n' for i in range(100)]
  (tmp_path / 'one.txt').write_text(''.join(lines))
  config = data_config(
    name='files', files=str(tmp_path / 'one.txt'), validation_fraction=0.1, test_fraction=0.2
  )
  parts = {
    split: ''.join(pipeline.texts(config, split)) for split in ('train', 'validation', 'test')
  }
  assert parts['train'] + parts['validation'] + parts['test'] == ''.join(lines)
  assert parts['test'].count('\n') in range(18, 22) and parts['validation'].count('\n') in range(
    8, 12
  )
  assert parts['validation'].startswith('line ') and parts['test'].startswith('line ')


def test_many_files_carve_disjoint_splits_and_a_missing_split_is_named(corpus_dir):
  config = data_config(
    name='files', files=str(corpus_dir / '*.txt'), validation_fraction=0.25, test_fraction=0.25
  )
  splits = {
    split: set(corpora.local_files(config, split)) for split in ('train', 'validation', 'test')
  }
  assert all(splits.values())
  assert not (
    splits['train'] & splits['validation']
    or splits['train'] & splits['test']
    or splits['validation'] & splits['test']
  )
  assert sum(len(v) for v in splits.values()) == 4
  assert corpora.split_plan(config) == corpora.split_plan(config)  # deterministic
  no_test = data_config(name='files', files=str(corpus_dir / '*.txt'))
  with pytest.raises(corpora.CorpusError, match="no 'test' split: set data.test_files"):
    corpora.local_files(no_test, 'test')


_PREPARE = """
import sys
from lmjax import config as config_lib
from lmjax.data import pipeline
c = config_lib.base_config().data
c.name, c.data_dir, c.manual_dir = 'tiny_shakespeare', sys.argv[1], sys.argv[2]
print(len(list(pipeline.texts(c, 'validation'))))
"""


@pytest.mark.slow
def test_processes_that_find_a_corpus_unprepared_build_it_once(tmp_path):
  # Two processes of one job (local_pod) used to build it both and race on tfds's
  # final rename: FileExistsError in one of them.
  import subprocess
  import sys

  from conftest import REPO

  workers = [
    subprocess.Popen(
      [sys.executable, '-c', _PREPARE, str(tmp_path), str(SHAKESPEARE_DIR)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(3)
  ]
  for worker in workers:
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == '1'
  assert (tmp_path / 'tiny_shakespeare').is_dir()
