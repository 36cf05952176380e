"""task='seq2seq': text pairs from files, rows with a target-only loss (packed
or one per row, decoder-only or encoder-decoder), cross-attention within a
pair, cached decoding, beam search against greedy, and training that learns a
synthetic extractive task (its ROUGE far above the untrained model's),
resumed bitwise, evaluated by `lmjax.evaluate`."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import evaluate
from lmjax import generation
from lmjax import models
from lmjax import steps
from lmjax import train
from lmjax.data import corpora
from lmjax.data import pairs
from lmjax.data import tokenizers
from lmjax.tasks import seq2seq

WORDS = 'apple river stone cloud tiger lemon piano rocket garden silver window candle'.split()


def synthetic_pairs(count: int, seed: int) -> list[dict]:
  """Sources of 3 or 4 sentences of random words; the target is the second sentence."""
  rng = random.Random(seed)
  sentence = lambda: ' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 5))).capitalize()
  out = []
  for _ in range(count):
    sentences = [sentence() + '.' for _ in range(rng.randint(3, 4))]
    out.append({'source': ' '.join(sentences), 'target': sentences[1]})
  return out


@pytest.fixture(scope='module')
def pair_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp('pairs')
  for name, count, seed in (('train', 2000, 0), ('valid', 64, 1)):
    with open(directory / f'{name}.jsonl', 'w') as f:
      for record in synthetic_pairs(count, seed):
        f.write(json.dumps(record) + '\n')
  return directory


def seq2seq_config(pair_files, tmp_path, **overrides):
  c = tiny_config(pair_files)
  settings = {
    'task': 'seq2seq',
    'data.files': str(pair_files / 'train.jsonl'),
    'data.validation_files': str(pair_files / 'valid.jsonl'),
    'data.cache_dir': str(tmp_path / 'cache'),
    'data.seq_len': 48,
    'tokenizer.kind': 'words',
    'tokenizer.word_split': 'punctuation',
    'seq2seq.max_target_tokens': 8,
    'seq2seq.eval_examples': 32,
    'model.num_heads': 4,
    'model.embed_dim': 128,
    'optimizer.weight_decay': 0.01,
    'train.num_steps': 400,
    'train.eval_every': 0,
    'train.log_every': 50,
    'train.final_eval_batches': -1,
    'checkpoint.every': 150,
    'sample.max_new_tokens': 0,
    **overrides,
  }
  for key, value in settings.items():
    config_lib.set_value(c, key, value)
  return c


def _tokenizer(config):
  return tokenizers.build(config.tokenizer, lambda: seq2seq.Seq2Seq().train_texts(config))


# ----------------------------------------------------------------------------
# Reading pairs.


@pytest.mark.parametrize('kind', ['jsonl', 'csv', 'tsv'])
def test_pairs_read_from_jsonl_csv_and_tsv_files_with_configurable_fields(kind, tmp_path):
  import csv

  rows = [('First text. Second.', 'Second.'), ('A "quoted", one.\tTab.', 'one')]
  path = tmp_path / f'pairs.{kind}'
  if kind == 'jsonl':
    path.write_text(''.join(json.dumps({'article': s, 'summary': t}) + '\n' for s, t in rows))
  else:
    with open(path, 'w', newline='') as f:
      writer = csv.writer(f, delimiter=',' if kind == 'csv' else '\t')
      writer.writerow(['article', 'summary'])
      writer.writerows(rows)
  config = seq2seq_config(tmp_path, tmp_path)
  config.data.files, config.data.validation_files = str(path), ''
  config.data.validation_fraction = 0.0
  with pytest.raises(corpora.CorpusError, match="no 'source' or 'target' field.*'article'"):
    list(pairs.examples(config.data, 'train'))
  config.data.source_key, config.data.target_key = 'article', 'summary'
  assert list(pairs.examples(config.data, 'train')) == rows


# ----------------------------------------------------------------------------
# Rows.


def _rows(config, tokenizer, split='validation'):
  layout = seq2seq.layout(config, tokenizer)
  return pairs.load(config.data, tokenizer, layout, split, log=lambda m: None), layout


@pytest.mark.parametrize('rows', ['packed', 'single'])
def test_decoder_rows_hold_eos_source_sep_target_eos_with_loss_on_the_target_only(
  rows, pair_files, tmp_path
):
  config = seq2seq_config(pair_files, tmp_path, **{'seq2seq.rows': rows})
  tokenizer = _tokenizer(config)
  split, layout = _rows(config, tokenizer)
  texts = split.texts(-1)
  sep, eos = tokenizer.vocab_size, tokenizer.eos_id
  assert layout.separator == (sep,)
  batch = split.rows.take(np.arange(len(split)))
  seen = 0
  for row in range(len(split)):
    segments = batch['segment_ids'][row]
    for segment in range(1, segments.max() + 1):
      where = segments == segment
      inputs, targets = batch['inputs'][row, where], batch['targets'][row, where]
      weights, positions = batch['weights'][row, where], batch['positions'][row, where]
      source, target = texts[split.rows.order[seen]]
      seen += 1
      cut = list(targets).index(sep)
      assert tokenizer.decode(targets[:cut]) == tokenizer.decode(tokenizer.encode(source))
      assert tokenizer.decode(targets[cut + 1 : -1]) == tokenizer.decode(tokenizer.encode(target))
      assert targets[-1] == eos and inputs[0] == eos
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      np.testing.assert_array_equal(positions, np.arange(where.sum()))
      # The loss is on the target's tokens and its end only: not on the source or SEP.
      np.testing.assert_array_equal(weights, np.arange(where.sum()) > cut)
    assert not batch['weights'][row, segments == 0].any()
  assert seen == split.num_pairs == 64
  if rows == 'packed':
    assert len(split) < 64  # pairs share rows
  else:
    assert len(split) == 64


def test_source_tokens_carry_no_loss(pair_files, tmp_path):
  """The loss, and so every gradient, is the same whatever the targets on source
  positions are (what the model predicts there is not trained)."""
  config = seq2seq_config(pair_files, tmp_path)
  tokenizer = _tokenizer(config)
  split, _ = _rows(config, tokenizer)
  batch = jax.tree.map(jnp.asarray, split.rows.take(np.arange(8)))
  model = seq2seq.Seq2Seq().build_model(config, type('D', (), {'vocab_size': tokenizer.vocab_size}))
  params = model.init(jax.random.key(0), batch['inputs'][:1])['params']
  loss = lambda b: steps.loss_fn(params, model, b, None, True)[0]
  grad = lambda b: jax.grad(lambda p: steps.loss_fn(p, model, b, None, True)[0])(params)
  source = batch['weights'] == 0
  scrambled = dict(batch, targets=jnp.where(source, (batch['targets'] + 7) % 20, batch['targets']))
  assert float(loss(scrambled)) == float(loss(batch))
  for a, b in zip(jax.tree.leaves(grad(scrambled)), jax.tree.leaves(grad(batch))):
    np.testing.assert_array_equal(a, b)
  # ... while a changed target token does change it.
  target = jnp.argmax(batch['weights'][0])
  changed = dict(batch, targets=batch['targets'].at[0, target].add(1))
  assert float(loss(changed)) != float(loss(batch))


def test_encoder_decoder_rows_pair_segments_across_encoder_and_decoder(pair_files, tmp_path):
  config = seq2seq_config(pair_files, tmp_path, **{'model.family': 'encoder_decoder'})
  tokenizer = _tokenizer(config)
  assert seq2seq.layout(config, tokenizer).target_len == 9  # max_target_tokens + 1
  config.seq2seq.target_len = 24  # room for two targets a row
  split, layout = _rows(config, tokenizer)
  assert layout.target_len == 24 and layout.separator == ()
  texts = split.texts(-1)
  batch = split.rows.take(np.arange(len(split)))
  assert batch['encoder_inputs'].shape == (len(split), 48)
  assert batch['inputs'].shape == (len(split), 24)
  seen = 0
  for row in range(len(split)):
    for segment in range(1, batch['segment_ids'][row].max() + 1):
      source, target = texts[split.rows.order[seen]]
      seen += 1
      encoded = batch['encoder_inputs'][row, batch['encoder_segment_ids'][row] == segment]
      decoded = batch['targets'][row, batch['segment_ids'][row] == segment]
      assert tokenizer.decode(encoded[:-1]) == tokenizer.decode(tokenizer.encode(source))
      assert tokenizer.decode(decoded[:-1]) == tokenizer.decode(tokenizer.encode(target))
      assert encoded[-1] == decoded[-1] == tokenizer.eos_id
  assert seen == 64 and len(split) < 64  # packed: several pairs to a row


def test_a_target_budget_that_leaves_no_room_for_the_source_is_a_clear_error(pair_files, tmp_path):
  config = seq2seq_config(pair_files, tmp_path, **{'seq2seq.max_target_tokens': 46})
  tokenizer = _tokenizer(config)
  with pytest.raises(ValueError, match='data.seq_len=48 leaves no room for the source'):
    _rows(config, tokenizer)


# ----------------------------------------------------------------------------
# The encoder-decoder.


def _encoder_decoder(vocab=40, scan=True, **kw):
  c = config_lib.base_config().model
  c.family, c.num_layers, c.num_heads, c.embed_dim, c.scan_layers = (
    'encoder_decoder',
    2,
    2,
    32,
    scan,
  )
  for key, value in kw.items():
    c[key] = value
  return models.build_model(c, vocab, 24)


@pytest.mark.parametrize('scan', [True, False])
def test_cross_attention_reads_only_its_own_pair_of_a_packed_row(scan):
  model = _encoder_decoder(scan=scan)
  rng = np.random.default_rng(0)
  source = rng.integers(3, 40, (1, 24))
  source_segments = np.array([[1] * 10 + [2] * 8 + [0] * 6])
  tokens = rng.integers(3, 40, (1, 12))
  segments = np.array([[1] * 5 + [2] * 5 + [0] * 2])
  positions = np.array([list(range(5)) * 2 + [0, 0]])
  source_positions = np.array([list(range(10)) + list(range(8)) + [0] * 6])
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']

  def logits(source):
    return model.apply(
      {'params': params},
      jnp.asarray(tokens),
      positions=jnp.asarray(positions),
      segment_ids=jnp.asarray(segments),
      encoder_tokens=jnp.asarray(source),
      encoder_positions=jnp.asarray(source_positions),
      encoder_segment_ids=jnp.asarray(source_segments),
    )

  base = logits(source)
  other = source.copy()
  other[0, 10:18] = (other[0, 10:18] + 5) % 37 + 3  # pair 2's source only
  changed = logits(other)
  np.testing.assert_allclose(changed[0, :5], base[0, :5], atol=1e-6)  # pair 1 unmoved
  assert np.abs(changed[0, 5:10] - base[0, 5:10]).max() > 1e-3  # pair 2 reads its source


@pytest.mark.parametrize('scan', [True, False])
def test_encoder_decoder_decodes_with_its_caches_as_the_full_forward(scan):
  model = _encoder_decoder(scan=scan)
  rng = np.random.default_rng(1)
  source = jnp.asarray(rng.integers(3, 40, (3, 20)))
  source_segments = jnp.asarray(np.arange(20) < np.array([[20], [13], [7]])).astype(jnp.int32)
  tokens = jnp.asarray(rng.integers(3, 40, (3, 9)))
  params = model.init(jax.random.key(0), tokens)['params']
  full = model.apply(
    {'params': params},
    tokens,
    encoder_tokens=source,
    encoder_segment_ids=source_segments,
    segment_ids=jnp.ones_like(tokens),
  )
  cache, stepped = None, []
  for position in range(tokens.shape[1]):
    variables = {'params': params} if cache is None else {'params': params, 'cache': cache}
    encoder = (
      {'encoder_tokens': source, 'encoder_segment_ids': source_segments} if cache is None else {}
    )
    out, updated = model.apply(
      variables,
      tokens[:, position : position + 1],
      positions=jnp.full((3, 1), position),
      decode=True,
      mutable=['cache'],
      **encoder,
    )
    cache = updated['cache']
    stepped.append(out[:, 0])
  np.testing.assert_allclose(np.stack(stepped, axis=1), full, atol=2e-5)


# ----------------------------------------------------------------------------
# Beam search.


def _models():
  built = {}
  for family in ('transformer', 'lstm', 'encoder_decoder'):
    c = config_lib.base_config().model
    c.family, c.num_layers, c.num_heads, c.embed_dim = family, 2, 2, 32
    built[family] = models.build_model(c, 30, 32)
  return built


@pytest.mark.parametrize('family', ['transformer', 'lstm', 'encoder_decoder'])
def test_beam_size_1_is_greedy(family):
  model = _models()[family]
  params = model.init(jax.random.key(3), jnp.zeros((1, 32), jnp.int32))['params']
  rng = np.random.default_rng(0)
  if family == 'encoder_decoder':
    kw = {'encoder_ids': [rng.integers(3, 30, n) for n in (9, 4, 12, 6)]}
    prompts = [np.array([1])] * 4
  else:
    kw = {}
    prompts = [rng.integers(3, 30, n) for n in (5, 1, 8, 3)]
  common = dict(vocab_size=30, **kw)
  free = generation.generate(params, model, prompts, 12, temperature=0.0, **common)
  eos = int(free[0, 3])  # a token greedy decoding emits: rows end at it
  greedy = generation.generate(params, model, prompts, 12, temperature=0.0, eos_id=eos, **common)
  beam = generation.generate(params, model, prompts, 12, beam_size=1, eos_id=eos, **common)
  ended = 0
  for g, b in zip(greedy, beam):
    stop = list(g).index(eos) + 1 if eos in g else len(g)
    ended += eos in g
    np.testing.assert_array_equal(b[:stop], g[:stop])
  assert ended >= 1


def _sequence_logp(params, model, prompt, continuation):
  tokens = np.concatenate([prompt, continuation])
  logits = model.apply({'params': params}, jnp.asarray(tokens[None, :-1]))
  logits = logits[0] if not models.is_recurrent(model) else logits[0][0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = logp[np.arange(len(tokens) - 1), tokens[1:]]
  return float(picked[len(prompt) - 1 :].sum())


@pytest.mark.parametrize('family', ['transformer', 'lstm'])
def test_beam_search_finds_a_more_likely_output_than_greedy(family):
  """Trained on: BOS A x EOS (60 %, x one of 6 tokens) or BOS B D EOS (40 %).
  Greedy takes A (0.6), then an x (0.1 each): 0.06 in all; beam search finds
  B D EOS (0.4)."""
  eos, a, b, d = 0, 1, 2, 3
  xs = np.arange(4, 10)
  model = _models()[family]
  rng = np.random.default_rng(0)
  first = rng.random(256) < 0.6
  rows = np.where(
    first[:, None],
    np.stack([np.full(256, a), rng.choice(xs, 256), np.full(256, eos)], 1),
    np.tile([b, d, eos], (256, 1)),
  )
  inputs = np.concatenate([np.full((256, 1), eos), rows[:, :-1]], axis=1)
  batch = {
    'inputs': jnp.asarray(inputs),
    'targets': jnp.asarray(rows),
    'weights': jnp.ones(rows.shape, jnp.float32),
  }
  params = model.init(jax.random.key(0), batch['inputs'][:1])['params']
  tx = optax.adam({'transformer': 1e-2, 'lstm': 3e-2}[family])
  state = tx.init(params)

  @jax.jit
  def update(params, state):
    grads = jax.grad(lambda p: steps.loss_fn(p, model, batch, None, True)[0])(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state

  for _ in range(250):
    params, state = update(params, state)
  prompt = np.array([eos])
  common = dict(vocab_size=30, eos_id=eos)
  greedy = generation.generate(params, model, prompt, 4, temperature=0.0, **common)[0]
  beam, score = generation.generate(
    params, model, prompt, 4, beam_size=4, return_scores=True, **common
  )
  assert greedy[0] == a and greedy[1] in xs and greedy[2] == eos
  assert list(beam[0, :3]) == [b, d, eos]
  greedy_logp = _sequence_logp(params, model, prompt, greedy[:3])
  beam_logp = _sequence_logp(params, model, prompt, beam[0, :3])
  assert beam_logp > greedy_logp + 0.9  # log(0.4 / 0.06) = 1.9
  np.testing.assert_allclose(score[0], beam_logp, atol=1e-3)  # alpha 0: the log-probability


def test_length_penalty_favours_the_longer_finished_hypothesis():
  """A higher alpha divides log-probabilities by more for longer outputs, so
  beam search can only get longer as alpha grows."""
  model = _models()['transformer']
  params = model.init(jax.random.key(5), jnp.zeros((1, 32), jnp.int32))['params']
  prompts = [np.array([1, 5, 7]), np.array([1, 9])]
  free = generation.generate(params, model, prompts, 10, temperature=0.0, vocab_size=30)
  eos = int(free[0, 2])

  def lengths(alpha):
    out = generation.generate(
      params, model, prompts, 10, beam_size=4, length_penalty=alpha, eos_id=eos, vocab_size=30
    )
    return [list(row).index(eos) + 1 if eos in row else 10 for row in out]

  short, long = lengths(0.0), lengths(2.0)
  assert all(s <= lo for s, lo in zip(short, long))


# ----------------------------------------------------------------------------
# Training, resuming and evaluating.


@pytest.fixture(scope='module')
def trained(pair_files, tmp_path_factory):
  base = tmp_path_factory.mktemp('seq2seq_runs')
  results = {}
  for family in ('transformer', 'encoder_decoder'):
    workdir = str(base / family)
    results[family] = train.train_and_evaluate(
      seq2seq_config(pair_files, base, **{'model.family': family}), workdir
    )
    untrained = seq2seq_config(pair_files, base, **{'model.family': family, 'train.num_steps': 1})
    results[f'{family} untrained'] = train.train_and_evaluate(untrained, str(base / f'{family}0'))
  return base, results


@pytest.mark.slow
@pytest.mark.parametrize('family', ['transformer', 'encoder_decoder'])
def test_a_tiny_model_learns_the_extractive_task_far_above_the_untrained_one(trained, family):
  _, results = trained
  result, untrained = results[family], results[f'{family} untrained']
  print(family, {k: round(result[k], 3) for k in ('loss', 'rouge1', 'rouge2', 'rougeL')})
  print('untrained', {k: round(untrained[k], 3) for k in ('loss', 'rouge1', 'rouge2', 'rougeL')})
  assert result['generated'] == 32
  assert untrained['rouge1'] < 0.2 and untrained['rougeL'] < 0.2
  assert result['rouge1'] > untrained['rouge1'] + 0.3
  assert result['rougeL'] > untrained['rougeL'] + 0.3
  assert result['loss'] < untrained['loss'] - 1.0
  assert 0 < result['lead3_rougeL'] == untrained['lead3_rougeL'] < 1


@pytest.mark.slow
def test_lmjax_evaluate_reports_rouge_and_lead_3(trained):
  base, results = trained
  result = evaluate.evaluate_checkpoint(str(base / 'transformer'), eval_examples=16, log=print)
  for key in ('rouge1', 'rouge2', 'rougeL', 'rougeLsum', 'lead3_rouge1', 'lead3_rougeL'):
    assert 0 <= result[key] <= 1, key
  assert result['generated'] == 16 and result['task'] == 'seq2seq'
  assert result['loss'] == pytest.approx(results['transformer']['loss'], rel=1e-5)
  assert result['perplexity'] == pytest.approx(np.exp(result['loss']), rel=1e-5)


@pytest.mark.slow
def test_resume_is_bitwise(pair_files, tmp_path):
  settings = {'train.num_steps': 40, 'checkpoint.every': 20, 'seq2seq.eval_examples': 4}
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  train.train_and_evaluate(seq2seq_config(pair_files, tmp_path, **settings), whole)
  stopped = seq2seq_config(pair_files, tmp_path, **{**settings, 'train.stop_at': 20})
  train.train_and_evaluate(stopped, split)
  train.train_and_evaluate(seq2seq_config(pair_files, tmp_path, **settings), split)

  def state_at(workdir):
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(f'{checkpoint.directory(workdir)}/40/state')

  for a, b in zip(jax.tree.leaves(state_at(whole)), jax.tree.leaves(state_at(split)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize('family', ['lstm', 'gru', 'rnn'])
def test_decoder_only_recurrent_models_train_on_single_rows(family, pair_files, tmp_path):
  overrides = {'model.family': family, 'train.num_steps': 150, 'seq2seq.eval_examples': 8}
  config = seq2seq_config(pair_files, tmp_path, **overrides)
  assert seq2seq.packed_rows(config) is False
  result = train.train_and_evaluate(config, str(tmp_path / family))
  untrained = seq2seq_config(pair_files, tmp_path, **{**overrides, 'train.num_steps': 1})
  before = train.train_and_evaluate(untrained, str(tmp_path / f'{family}0'))
  assert result['loss'] < before['loss'] - 0.8
  assert result['generated'] == 8 and 0 <= result['rouge1'] <= 1


@pytest.mark.slow
def test_an_imported_hugging_face_model_fine_tunes_on_pairs_with_a_text_separator(
  pair_files, tmp_path
):
  """The imported vocabulary is fixed: SEP is text (seq2seq.separator), so the
  model keeps the pre-trained shapes and init_from restores every parameter."""
  from test_hf import build

  from lmjax import hf

  build('gpt2', tmp_path / 'hf')
  base = tiny_config(pair_files, **{'data.seq_len': 48})
  hf.import_model(str(tmp_path / 'hf'), str(tmp_path / 'run'), base, log=lambda m: None)
  config = config_lib.load_config_file(f'configs/finetune_hf.py:{tmp_path / "run"}')
  settings = {
    'task': 'seq2seq',
    'data.name': 'files',
    'data.files': str(pair_files / 'train.jsonl'),
    'data.validation_files': str(pair_files / 'valid.jsonl'),
    'data.cache_dir': str(tmp_path / 'cache'),
    'data.seq_len': 48,
    'seq2seq.separator': ' =',
    'seq2seq.max_target_tokens': 16,
    'seq2seq.eval_examples': 8,
    'finetune.mode': 'full',
    'optimizer.learning_rate': 1e-2,
    'optimizer.warmup_steps': 5,
    'train.batch_size': 16,
    'train.eval_batch_size': 16,
    'train.eval_every': 0,
    'checkpoint.every': 1000,
    'sample.max_new_tokens': 0,
    'compilation_cache_dir': '',
  }
  for key, value in settings.items():
    config_lib.set_value(config, key, value)
  before = train.train_and_evaluate(
    dict_config(config, **{'train.num_steps': 1}), str(tmp_path / 'before')
  )
  after = train.train_and_evaluate(
    dict_config(config, **{'train.num_steps': 100}), str(tmp_path / 'after')
  )
  assert after['loss'] < before['loss'] - 1.0
  assert after['generated'] == 8


def dict_config(config, **overrides):
  copy = config_lib.from_json(config_lib.to_json(config))
  for key, value in overrides.items():
    config_lib.set_value(copy, key, value)
  return copy


def test_families_and_rows_that_cannot_serve_a_task_are_clear_errors(pair_files, tmp_path):
  from lmjax import validation

  with pytest.raises(config_lib.ConfigError, match="serves task='seq2seq', not task='lm'"):
    validation.check(tiny_config(pair_files, **{'model.family': 'encoder_decoder'}))
  with pytest.raises(config_lib.ConfigError, match="model.family='encoder' cannot"):
    validation.check(seq2seq_config(pair_files, tmp_path, **{'model.family': 'encoder'}))
  packed_lstm = {'model.family': 'lstm', 'seq2seq.rows': 'packed'}
  with pytest.raises(config_lib.ConfigError, match="recurrent.*seq2seq.rows='single'"):
    validation.check(seq2seq_config(pair_files, tmp_path, **packed_lstm))
  with pytest.raises(config_lib.ConfigError, match='seq2seq.rows must be one of auto, packed'):
    validation.check(seq2seq_config(pair_files, tmp_path, **{'seq2seq.rows': 'dense'}))
  validation.check(seq2seq_config(pair_files, tmp_path, **{'model.family': 'lstm'}))
