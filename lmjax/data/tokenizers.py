"""Tokenizers: bytes, characters, words, sentencepiece and Hugging Face's.

Each tokenizer is fully described by `to_json()` (the sentencepiece model is
embedded), which lmjax saves in the workdir and inside every checkpoint, so
evaluation and sampling need nothing else. `fingerprint()` names it compactly
(kind, vocabulary size, hash of its content) for mismatch checks.
"""

import base64
import collections
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
import sentencepiece
import tokenizers as hf_tokenizers

from lmjax import fs


class TokenizerError(ValueError):
  """A tokenizer that cannot be built, loaded or used."""


class Tokenizer:
  """Interface: text <-> int32 token ids; `eos_id` ends every document."""

  kind: str
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each token stands for ([vocab_size] int32); 0 for specials."""
    raise NotImplementedError

  def to_json(self) -> dict:
    raise NotImplementedError

  def fingerprint(self) -> dict:
    content = json.dumps(self.to_json(), sort_keys=True).encode()
    return {
      'kind': self.kind,
      'vocab_size': self.vocab_size,
      'sha256': hashlib.sha256(content).hexdigest()[:16],
    }


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, and 256 as the end-of-document token."""

  kind = 'bytes'
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    sizes = np.ones(self.vocab_size, np.int32)
    sizes[self.eos_id] = 0
    return sizes

  def to_json(self) -> dict:
    return {'kind': self.kind}


class CharTokenizer(Tokenizer):
  """Unicode characters seen in the training split; <eos>=0, <unk>=1."""

  kind = 'chars'
  eos_id = 0
  unk_id = 1
  _SPECIALS = 2

  def __init__(self, chars: Sequence[str]):
    self.chars = sorted(set(chars))
    self.vocab_size = len(self.chars) + self._SPECIALS
    self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)

  @classmethod
  def build(cls, texts: Iterable[str]) -> 'CharTokenizer':
    seen = set()
    for text in texts:
      seen.update(text)
    if not seen:
      raise TokenizerError('cannot build a character vocabulary: the training split has no text')
    return cls(sorted(seen))

  def encode(self, text: str) -> np.ndarray:
    codepoints = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32).astype(np.int64)
    index = np.searchsorted(self._codepoints, codepoints)
    index = np.minimum(index, len(self._codepoints) - 1)
    known = self._codepoints[index] == codepoints
    return np.where(known, index + self._SPECIALS, self.unk_id).astype(np.int32)

  def unknown_chars(self, text: str) -> list[str]:
    """Characters of `text` outside the vocabulary, in order of appearance."""
    known = set(self.chars)
    return list(dict.fromkeys(c for c in text if c not in known))

  def decode(self, ids: Iterable[int]) -> str:
    pieces = []
    for i in ids:
      i = int(i)
      if i >= self._SPECIALS and i < self.vocab_size:
        pieces.append(self.chars[i - self._SPECIALS])
      elif i == self.unk_id:
        pieces.append('\ufffd')
    return ''.join(pieces)

  def token_bytes(self) -> np.ndarray:
    sizes = [0] * self._SPECIALS + [len(c.encode('utf-8')) for c in self.chars]
    return np.array(sizes, np.int32)

  def to_json(self) -> dict:
    return {'kind': self.kind, 'chars': ''.join(self.chars)}


class WordTokenizer(Tokenizer):
  """Words of the training split; `<eos>`=0 ends every line, `<unk>`=1.

  `split='whitespace'` takes already-tokenized text (PTB style: one sentence a
  line, words separated by spaces) as it is, so the vocabulary is exactly the
  corpus' own (a corpus that writes `<unk>` itself shares that id).
  `split='punctuation'` also cuts punctuation off words. Words are ordered by
  frequency, then alphabetically.
  """

  kind = 'words'
  eos_id = 0
  unk_id = 1
  SPECIALS = ('<eos>', '<unk>')
  SPLITS = ('whitespace', 'punctuation')
  _PUNCTUATION = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

  def __init__(self, words: Sequence[str], split: str = 'whitespace'):
    if split not in self.SPLITS:
      raise TokenizerError(
        f'tokenizer.word_split must be one of {", ".join(self.SPLITS)}, got {split!r}'
      )
    self.split = split
    self.words = [w for w in words if w not in self.SPECIALS]
    self.vocab = list(self.SPECIALS) + self.words
    self.vocab_size = len(self.vocab)
    self._ids = {word: i for i, word in enumerate(self.vocab)}

  def _words(self, line: str) -> list[str]:
    return line.split() if self.split == 'whitespace' else self._PUNCTUATION.findall(line)

  @classmethod
  def build(
    cls, texts: Iterable[str], split: str = 'whitespace', max_size: int = 0, min_count: int = 1
  ) -> 'WordTokenizer':
    """Counts the words of `texts`; keeps those seen `min_count` times, at most
    `max_size` of them (0 = all), the specials included."""
    splitter = cls([], split)
    counts = collections.Counter()
    for text in texts:
      for line in text.split('\n'):
        counts.update(splitter._words(line))
    for special in cls.SPECIALS:
      counts.pop(special, None)
    if not counts:
      raise TokenizerError('cannot build a word vocabulary: the training split has no words')
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_size:
      kept = kept[: max(0, max_size - len(cls.SPECIALS))]
    return cls(kept, split)

  def encode(self, text: str) -> np.ndarray:
    """Word ids, with `<eos>` after every line (a final line without a newline too)."""
    ids = []
    lines = text.split('\n')
    if lines and lines[-1] == '':
      lines.pop()  # The text ended with a newline: no extra line.
    for line in lines:
      ids.extend(self._ids.get(word, self.unk_id) for word in self._words(line))
      ids.append(self.eos_id)
    return np.array(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    out, line = [], []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        out.append(' '.join(line) + '\n')
        line = []
      elif 0 <= i < self.vocab_size:
        line.append(self.vocab[i])
    return ''.join(out) + ' '.join(line)

  def token_bytes(self) -> np.ndarray:
    # A word stands for itself and the space after it; <eos> for the newline.
    sizes = [1, 0] + [len(w.encode('utf-8')) + 1 for w in self.words]
    return np.array(sizes, np.int32)

  def to_json(self) -> dict:
    return {'kind': self.kind, 'split': self.split, 'words': self.words}


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (BPE or unigram), with byte fallback when trained here."""

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self.threads = os.cpu_count() or 1  # encode_batch's threads (a store worker may take fewer)
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._processor.eos_id()
    if self.eos_id < 0:
      raise TokenizerError('the sentencepiece model has no end-of-sentence piece (eos_id < 0)')

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    if not fs.exists(path):
      raise TokenizerError(f'sentencepiece model {path!r} does not exist')
    with fs.open(path, 'rb') as f:
      proto = f.read()
    try:
      return cls(proto)
    except (RuntimeError, OSError) as error:
      raise TokenizerError(f'{path}: not a sentencepiece model ({error})') from None

  @classmethod
  def train(
    cls,
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = 'bpe',
    sample_chars: int = 10_000_000,
  ) -> 'SentencePieceTokenizer':
    """Trains on up to `sample_chars` characters of `texts`, kept verbatim.

    Text is not normalised (identity rule) and whitespace is kept, so code and
    verse round-trip exactly; newlines are a piece of their own and unseen
    characters fall back to bytes.
    """
    lines, taken = [], 0
    for text in texts:
      for line in text.split('\n'):
        if line:
          lines.append(line[:4096])
          taken += len(line)
      if taken >= sample_chars:
        break
    if not lines:
      raise TokenizerError('cannot train sentencepiece: the training split has no text')
    model = io.BytesIO()
    try:
      sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=['\n', '\t'],
        max_sentence_length=16384,
        input_sentence_size=0,
        num_threads=os.cpu_count() or 1,
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=-1,
        minloglevel=2,
      )
    except RuntimeError as error:
      raise TokenizerError(
        f'sentencepiece training failed with vocab_size={vocab_size} on {taken} characters: {error}'
      ) from None
    return cls(model.getvalue())

  def encode(self, text: str) -> np.ndarray:
    return np.array(self._processor.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encoded = self._processor.encode(list(texts), num_threads=self.threads)
    return [np.array(ids, dtype=np.int32) for ids in encoded]

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def token_bytes(self) -> np.ndarray:
    sizes = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._processor.is_control(i) or self._processor.is_unknown(i):
        continue
      if self._processor.is_byte(i):
        sizes[i] = 1
      else:
        sizes[i] = len(self._processor.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return sizes

  def save(self, path: str) -> None:
    with fs.open(path, 'wb') as f:
      f.write(self.model_proto)

  def to_json(self) -> dict:
    return {'kind': self.kind, 'model': base64.b64encode(self.model_proto).decode('ascii')}


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (byte-level BPE as GPT-2's and Llama 3's,
  WordPiece as BERT's, ...) run by the `tokenizers` library, with the model's
  special tokens: `eos_id` is its end-of-text token (BERT: [SEP]), and bos,
  pad, mask, cls, sep and unk are kept by name in `specials`. Text is encoded
  without the model's template of special tokens: lmjax adds EOS itself."""

  kind = 'huggingface'
  SPECIALS = ('eos', 'bos', 'pad', 'mask', 'cls', 'sep', 'unk')

  def __init__(self, tokenizer_json: str, specials: dict):
    self.tokenizer_json, self.specials = tokenizer_json, dict(specials)
    self.tokenizer = hf_tokenizers.Tokenizer.from_str(tokenizer_json)
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    eos = self.specials.get('eos', self.specials.get('sep'))
    if eos is None:
      raise TokenizerError(
        'the Hugging Face tokenizer names no end-of-text token (eos_token, or sep_token); '
        'set eos_token in its tokenizer_config.json'
      )
    self.eos_id = int(eos)
    self._bytes = None

  @classmethod
  def load(cls, path: str) -> 'HuggingFaceTokenizer':
    """From a model directory (or its tokenizer.json): the special tokens come
    from tokenizer_config.json / special_tokens_map.json, else config.json's ids."""
    directory = path if fs.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, 'tokenizer.json') if fs.isdir(path) else path
    if not fs.exists(file):
      raise TokenizerError(
        f'{file} is missing: tokenizer.kind=huggingface reads a tokenizer.json '
        '(for a SentencePiece-only model, use tokenizer.kind=sentencepiece with '
        'tokenizer.model_file=DIR/tokenizer.model)'
      )
    with fs.open(file) as f:
      tokenizer_json = f.read()
    vocabulary = hf_tokenizers.Tokenizer.from_str(tokenizer_json)
    specials = {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):
      record = _read_json_file(os.path.join(directory, name))
      for kind in cls.SPECIALS:
        token = record.get(f'{kind}_token')
        token = token.get('content') if isinstance(token, dict) else token
        if isinstance(token, str) and vocabulary.token_to_id(token) is not None:
          specials.setdefault(kind, vocabulary.token_to_id(token))
    model = _read_json_file(os.path.join(directory, 'config.json'))
    for kind in ('eos', 'bos', 'pad'):
      value = model.get(f'{kind}_token_id')
      value = value[0] if isinstance(value, list) and value else value
      if isinstance(value, int) and kind not in specials:
        specials[kind] = value
    return cls(tokenizer_json, specials)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encoded]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    if self._bytes is None:
      special = set(self.specials.values())
      self._bytes = np.array(
        [
          0 if i in special else len(self.tokenizer.decode([i]).encode('utf-8'))
          for i in range(self.vocab_size)
        ],
        np.int32,
      )
    return self._bytes

  def to_json(self) -> dict:
    return {'kind': self.kind, 'tokenizer_json': self.tokenizer_json, 'specials': self.specials}


def _read_json_file(path: str) -> dict:
  if not fs.exists(path):
    return {}
  with fs.open(path) as f:
    return json.load(f)


def from_json(data: dict) -> Tokenizer:
  kind = data.get('kind')
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'chars':
    return CharTokenizer(list(data['chars']))
  if kind == 'words':
    return WordTokenizer(data['words'], data['split'])
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(base64.b64decode(data['model']))
  if kind == 'huggingface':
    return HuggingFaceTokenizer(data['tokenizer_json'], data['specials'])
  raise TokenizerError(f'unknown tokenizer kind {kind!r}; expected one of {", ".join(KINDS)}')


KINDS = ('bytes', 'chars', 'words', 'sentencepiece', 'huggingface')


def build(tokenizer_config, train_texts) -> Tokenizer:
  """Builds the configured tokenizer; `train_texts()` iterates the training split."""
  kind = tokenizer_config.kind
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'chars':
    return CharTokenizer.build(_sample(train_texts(), tokenizer_config.sample_chars))
  if kind == 'words':
    return WordTokenizer.build(
      _sample(train_texts(), tokenizer_config.sample_chars),
      tokenizer_config.word_split,
      tokenizer_config.max_size,
      tokenizer_config.min_count,
    )
  if kind == 'sentencepiece':
    if tokenizer_config.model_file:
      return SentencePieceTokenizer.load(tokenizer_config.model_file)
    return SentencePieceTokenizer.train(
      train_texts(),
      tokenizer_config.vocab_size,
      tokenizer_config.model_type,
      tokenizer_config.sample_chars,
    )
  if kind == 'huggingface':
    if not tokenizer_config.model_file:
      raise TokenizerError(
        'tokenizer.kind=huggingface needs tokenizer.model_file: a Hugging Face model '
        'directory or its tokenizer.json'
      )
    return HuggingFaceTokenizer.load(tokenizer_config.model_file)
  raise TokenizerError(f'unknown tokenizer.kind {kind!r}; expected one of {", ".join(KINDS)}')


def _sample(texts: Iterable[str], chars: int) -> Iterator[str]:
  """The first documents of `texts`, up to about `chars` characters: a vocabulary
  is built from a bounded stream, however large the split."""
  taken = 0
  for text in texts:
    yield text
    taken += len(text)
    if taken >= chars:
      return


TOKENIZER_FILE = 'tokenizer.json'


def for_run(
  tokenizer_config, workdir: str, train_texts, given: Tokenizer | None = None
) -> Tokenizer:
  """The run's tokenizer: the workdir's saved one, or a new one saved there
  (`given`, a fine-tuned run's pre-trained tokenizer, or one built from
  `train_texts`)."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if fs.exists(path):
    with fs.open(path) as f:
      tokenizer = from_json(json.load(f))
    if tokenizer.kind != tokenizer_config.kind:
      raise TokenizerError(
        f'{path} holds a {tokenizer.kind!r} tokenizer but the config asks '
        f'for {tokenizer_config.kind!r}; use another workdir'
      )
    if given is not None and given.fingerprint() != tokenizer.fingerprint():
      raise TokenizerError(
        f'{path} holds tokenizer {tokenizer.fingerprint()}, but init_from '
        f'was trained with {given.fingerprint()}; use another workdir'
      )
    return tokenizer
  tokenizer = given or build(tokenizer_config, train_texts)
  # Every process of a multi-host run builds the same tokenizer and may write it:
  # each through its own temporary file, then an atomic rename over the same name.
  temporary = f'{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}'
  with fs.open(temporary, 'w') as f:
    json.dump(tokenizer.to_json(), f)
  fs.replace(temporary, path)
  if isinstance(tokenizer, SentencePieceTokenizer):  # For other tools' convenience.
    tokenizer.save(os.path.join(workdir, 'tokenizer.model'))
  return tokenizer
