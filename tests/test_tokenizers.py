"""Each tokenizer round-trips text, serialises losslessly and counts bytes right."""

import numpy as np
import pytest

from lmjax.data import tokenizers

TEXT = 'def f(x):\n\treturn x + 1  # café ☕ 日本\n\nROMEO: O, she doth teach the torches!'


def test_bytes_round_trip_and_bytes_per_token():
  tokenizer = tokenizers.ByteTokenizer()
  ids = tokenizer.encode(TEXT)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tokenizer.decode(ids) == TEXT
  assert tokenizer.token_bytes()[ids].sum() == len(TEXT.encode('utf-8'))
  assert tokenizer.token_bytes()[tokenizer.eos_id] == 0


def test_chars_round_trip_unknown_and_json():
  tokenizer = tokenizers.CharTokenizer.build([TEXT[:40], TEXT[40:]])
  ids = tokenizer.encode(TEXT)
  assert tokenizer.decode(ids) == TEXT
  assert tokenizer.vocab_size == len(set(TEXT)) + 2
  assert tokenizer.token_bytes()[ids].sum() == len(TEXT.encode('utf-8'))
  unknown = tokenizer.encode('xyz€')
  assert unknown[-1] == tokenizer.unk_id
  assert tokenizer.unknown_chars('ee€t') == ['€']
  restored = tokenizers.from_json(tokenizer.to_json())
  assert restored.fingerprint() == tokenizer.fingerprint()
  np.testing.assert_array_equal(restored.encode(TEXT), ids)


def test_chars_empty_training_split_fails():
  with pytest.raises(tokenizers.TokenizerError, match='no text'):
    tokenizers.CharTokenizer.build(['', ''])


@pytest.fixture(scope='module')
def sentencepiece_tokenizer():
  from conftest import shakespeare_text

  return tokenizers.SentencePieceTokenizer.train(
    [shakespeare_text()[:300_000]], vocab_size=512, sample_chars=300_000
  )


def test_sentencepiece_trains_and_round_trips(sentencepiece_tokenizer):
  tokenizer = sentencepiece_tokenizer
  assert tokenizer.vocab_size == 512
  ids = tokenizer.encode(TEXT)
  # Identity normalisation and byte fallback: code, tabs, newlines and unseen characters survive.
  assert tokenizer.decode(ids) == TEXT
  verse = 'ROMEO:\nBut, soft! what light through yonder window breaks?\n'
  assert tokenizer.decode(tokenizer.encode(verse)) == verse
  assert len(tokenizer.encode(verse)) < 0.75 * len(verse)  # It learned merges.
  batch = tokenizer.encode_batch([TEXT, verse])
  np.testing.assert_array_equal(batch[1], tokenizer.encode(verse))
  assert abs(int(tokenizer.token_bytes()[tokenizer.encode(verse)].sum()) - len(verse)) <= 1


def test_sentencepiece_serialises_and_loads_from_file(sentencepiece_tokenizer, tmp_path):
  tokenizer = sentencepiece_tokenizer
  restored = tokenizers.from_json(tokenizer.to_json())
  assert restored.fingerprint() == tokenizer.fingerprint()
  tokenizer.save(str(tmp_path / 'x.model'))
  loaded = tokenizers.SentencePieceTokenizer.load(str(tmp_path / 'x.model'))
  np.testing.assert_array_equal(loaded.encode(TEXT), tokenizer.encode(TEXT))
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  with pytest.raises(tokenizers.TokenizerError, match='bad.model'):
    tokenizers.SentencePieceTokenizer.load(str(tmp_path / 'bad.model'))


def test_sentencepiece_vocabulary_too_large_is_a_clear_error():
  with pytest.raises(tokenizers.TokenizerError, match='vocab_size=5000'):
    tokenizers.SentencePieceTokenizer.train(['tiny corpus, few pieces'], vocab_size=5000)


def test_for_run_saves_and_reuses_the_tokenizer(tmp_path):
  import ml_collections

  config = ml_collections.ConfigDict(
    {'kind': 'chars', 'model_file': '', 'vocab_size': 0, 'model_type': 'bpe', 'sample_chars': 0}
  )
  calls = []

  def texts():
    calls.append(1)
    return iter(['abc'])

  first = tokenizers.for_run(config, str(tmp_path), texts)
  second = tokenizers.for_run(config, str(tmp_path), lambda: iter(['xyz']))
  assert first.fingerprint() == second.fingerprint() and len(calls) == 1
  config.kind = 'bytes'
  with pytest.raises(tokenizers.TokenizerError, match="'chars' tokenizer"):
    tokenizers.for_run(config, str(tmp_path), texts)


PTB_SAMPLE = (
  ' aer banknote berlitz calloway centrust <unk> \n'
  ' pierre <unk> N years old will join the board as a nonexecutive director nov. N \n'
  ' mr. <unk> is chairman of <unk> n.v. the dutch publishing group \n'
)


def test_words_reproduce_a_ptb_style_vocabulary_exactly():
  tokenizer = tokenizers.WordTokenizer.build([PTB_SAMPLE])
  corpus_words = set(PTB_SAMPLE.split())
  # The corpus' own <unk> is the tokenizer's <unk>; <eos> is the only addition.
  assert set(tokenizer.vocab) == corpus_words | {'<eos>'}
  assert tokenizer.vocab_size == len(corpus_words) + 1
  ids = tokenizer.encode(PTB_SAMPLE)
  assert int((ids == tokenizer.eos_id).sum()) == 3  # one <eos> per line
  assert int((ids == tokenizer.unk_id).sum()) == PTB_SAMPLE.split().count('<unk>')
  assert tokenizer.decode(ids).split('\n')[:3] == [
    ' '.join(line.split()) for line in PTB_SAMPLE.strip('\n').split('\n')
  ]
  assert tokenizer.vocab[2:4] == ['N', 'the']  # most frequent first, ties alphabetical
  restored = tokenizers.from_json(tokenizer.to_json())
  assert restored.fingerprint() == tokenizer.fingerprint()


def test_words_max_size_min_count_and_punctuation_split():
  text = 'the cat, the dog; the cat!\nA dog.\n'
  counted = tokenizers.WordTokenizer.build([text], split='punctuation', min_count=2)
  assert counted.words == ['the', 'cat', 'dog']
  capped = tokenizers.WordTokenizer.build([text], split='punctuation', max_size=4)
  assert capped.vocab == ['<eos>', '<unk>', 'the', 'cat']
  ids = capped.encode('the bird, the cat')
  assert list(ids) == [2, 1, 1, 2, 3, 0]  # bird and ',' are unknown; one line, one <eos>
  with pytest.raises(tokenizers.TokenizerError, match='word_split must be one of'):
    tokenizers.WordTokenizer([], split='spaces')


def test_words_are_built_from_the_config(tmp_path):
  from lmjax import config as config_lib

  config = config_lib.base_config().tokenizer
  config.kind, config.word_split, config.min_count = 'words', 'punctuation', 2
  tokenizer = tokenizers.for_run(config, str(tmp_path), lambda: iter(['a b, a b. c\n']))
  assert isinstance(tokenizer, tokenizers.WordTokenizer)
  assert tokenizer.vocab == ['<eos>', '<unk>', 'a', 'b']
