"""Recurrent LMs (Elman RNN, LSTM, GRU): gradients, carried state, Zaremba configs, training."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import models
from lmjax import steps
from lmjax import train
from lmjax import train_state
from lmjax.models import recurrent


def recurrent_model(family, vocab=50, **fields):
  c = config_lib.base_config().model
  c.family, c.num_layers, c.embed_dim, c.hidden_dim, c.tie_embeddings = family, 2, 16, 24, False
  for key, value in fields.items():
    c[key] = value
  return models.build_model(c, vocab, 16)


def init_params(model, seed=0):
  import flax.linen as nn

  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 16), jnp.int32))['params'])


@pytest.mark.parametrize('cell', recurrent.CELLS)
def test_hand_scheduled_backward_equals_autodiff_of_the_loop(cell):
  rng = np.random.default_rng(0)
  gates, num_states = {'rnn': 1, 'lstm': 4, 'gru': 3}[cell], 2 if cell == 'lstm' else 1
  time_, batch, hidden = 6, 3, 5
  gx = jnp.asarray(rng.normal(size=(time_, batch, gates * hidden)), jnp.float32)
  w_hh = jnp.asarray(rng.normal(size=(hidden, gates * hidden)) * 0.5, jnp.float32)
  b_hh = jnp.asarray(rng.normal(size=gates * hidden), jnp.float32) if cell == 'gru' else None
  state = tuple(
    jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32) for _ in range(num_states)
  )

  def plain(gx, w_hh, b_hh, state):  # lax.scan, differentiated by JAX
    final, states, _ = recurrent.forward(cell, gx, w_hh, b_hh, state)
    return states[0], final

  def loss(fn):
    def value(*args):
      outputs, final = fn(*args)
      return jnp.sum(jnp.sin(outputs)) + sum(jnp.sum(s**2) for s in final)

    return value

  args = (gx, w_hh, b_hh, state)
  expected = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args)
  got = jax.grad(loss(lambda *a: recurrent.recurrence(cell, *a)), argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(
    loss(plain)(*args), loss(lambda *a: recurrent.recurrence(cell, *a))(*args), rtol=1e-6
  )
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', recurrent.CELLS)
def test_causal_and_the_carry_is_the_state_after_the_batch(family):
  model = recurrent_model(family)
  params = init_params(model)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 16)))
  logits, carry = model.apply({'params': params}, tokens)
  assert logits.shape == (2, 16, 50)
  assert carry.shape == recurrent.carry_shape(model, 2)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 50)
  logits_changed, _ = model.apply({'params': params}, changed)
  np.testing.assert_allclose(logits[:, :10], logits_changed[:, :10], atol=1e-6)
  assert not np.allclose(logits[:, 10:], logits_changed[:, 10:], atol=1e-4)
  # Two halves with the carry passed along == the whole sequence at once.
  first, carry_half = model.apply({'params': params}, tokens[:, :8])
  second, carry_end = model.apply({'params': params}, tokens[:, 8:], carry=carry_half)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), logits, atol=1e-5)
  np.testing.assert_allclose(carry_end, carry, atol=1e-5)
  # reset = 1 forgets the carry for that row only.
  reset = jnp.asarray([1.0, 0.0])
  again, _ = model.apply({'params': params}, tokens[:, 8:], carry=carry_half, reset=reset)
  fresh, _ = model.apply({'params': params}, tokens[:, 8:])
  np.testing.assert_allclose(again[0], fresh[0], atol=1e-6)
  np.testing.assert_allclose(again[1], second[1], atol=1e-6)


def test_vocabulary_lookup_path_equals_the_projection_path():
  """Layer 0 projects the embedding table instead of the embedded tokens when
  the vocabulary is smaller than the batch: the same function."""
  model = recurrent_model('lstm', vocab=50)
  params = init_params(model)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (8, 16)))  # 128 > 50: lookup
  big, _ = model.apply({'params': params}, tokens)
  small, _ = model.apply({'params': params}, tokens[:2, :8])  # 16 < 50: projection
  np.testing.assert_allclose(big[:2, :8], small, atol=1e-5)


def test_uniform_init_scale_and_tied_embeddings():
  model = recurrent_model('lstm', init_scale=0.1)
  params = init_params(model)
  for leaf in jax.tree.leaves(params):
    assert float(jnp.max(jnp.abs(leaf))) <= 0.1
  assert float(jnp.std(params['layer_0']['w_hh'])) > 0.05  # uniform(-0.1, 0.1): std 0.058
  tied = recurrent_model('gru', tie_embeddings=True, embed_dim=24)
  assert 'unembed' not in init_params(tied)
  with pytest.raises(
    ValueError,
    match=r'tie_embeddings needs model.embed_dim \(16\) == '
    r'model.hidden_dim \(24\)',
  ):
    init_params(recurrent_model('rnn', tie_embeddings=True))


@pytest.mark.parametrize(
  'size,epochs,decay_after,factor',
  [('small', 13, 4, 0.5), ('medium', 39, 6, 0.8), ('large', 55, 14, 1 / 1.15)],
)
def test_zaremba_configs_and_their_learning_rate_table(size, epochs, decay_after, factor):
  config = config_lib.load_config_file(str(REPO / 'configs' / f'ptb_lstm_{size}.py') + ':/ptb')
  hidden, unroll, dropout, init_scale = {
    'small': (200, 20, 0.0, 0.1),
    'medium': (650, 35, 0.5, 0.05),
    'large': (1500, 35, 0.65, 0.04),
  }[size]
  m, t, o = config.model, config.train, config.optimizer
  assert (m.family, m.num_layers, m.hidden_dim, m.embed_dim) == ('lstm', 2, hidden, hidden)
  assert (m.dropout, m.init_scale, config.data.seq_len, t.batch_size) == (
    dropout,
    init_scale,
    unroll,
    20,
  )
  assert (o.name, o.learning_rate, o.grad_clip, t.num_epochs) == ('sgd', 1.0, 5.0, epochs)
  assert config.data.files == '/ptb/ptb.train.txt' and config.data.layout == 'stream'
  assert config.tokenizer.kind == 'words' and t.loss_normalization == 'rows'
  # PTB's training split is 929,589 tokens (words and <eos>): an epoch of batch
  # 20 is (929,589 - 1) // 20 // unroll steps (the reference implementation's).
  steps_per_epoch = (929_589 - 1) // 20 // unroll
  _, schedule = train_state.make_optimizer(o, epochs * steps_per_epoch, steps_per_epoch)
  for epoch in range(epochs):  # 0-based, as in the reference implementation
    expected = factor ** max(epoch + 1 - decay_after, 0)
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)  # float32
  assert float(schedule(decay_after * steps_per_epoch - 1)) == 1.0
  np.testing.assert_allclose(float(schedule(decay_after * steps_per_epoch)), factor, rtol=1e-6)


def test_row_normalised_loss_is_summed_over_time():
  model = recurrent_model('lstm')
  params = init_params(model)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, (4, 17)))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': jnp.ones((4, 16))}
  per_token, _ = steps.loss_fn(params, model, batch, None, True)
  per_row, _ = steps.loss_fn(params, model, batch, None, True, normalization='rows')
  np.testing.assert_allclose(per_row, 16 * per_token, rtol=1e-6)
  with pytest.raises(ValueError, match="loss_normalization must be 'tokens' or 'rows'"):
    steps.loss_fn(params, model, batch, None, True, normalization='sum')


# ----------------------------------------------------------------------------
# Training end to end, on the tiny-shakespeare files.


def rnn_config(corpus_dir, **overrides):
  fields = {
    'model.family': 'lstm',
    'model.num_layers': 1,
    'model.embed_dim': 64,
    'model.hidden_dim': 128,
    'model.tie_embeddings': False,
    'data.layout': 'stream',
    'data.seq_len': 8,
    'train.batch_size': 16,
    'train.eval_batch_size': 16,
    'train.num_steps': 160,
    'train.eval_every': 80,
    'train.eval_batches': 10,
    'checkpoint.every': 80,
    'train.log_every': 20,
    'train.final_eval_batches': -1,
    'optimizer.name': 'adam',
    'optimizer.learning_rate': 1e-2,
    'optimizer.weight_decay': 0.0,
    'optimizer.grad_clip': 5.0,
    'sample.max_new_tokens': 0,
  }
  fields.update(overrides)
  return tiny_config(corpus_dir, **fields)


@pytest.fixture(scope='module')
def lstm_runs(corpus_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp('lstm')
  dirs = {name: str(base / name) for name in ('carried', 'reset', 'split')}
  results = {
    'carried': train.train_and_evaluate(rnn_config(corpus_dir), dirs['carried']),
    'reset': train.train_and_evaluate(
      rnn_config(corpus_dir, **{'train.carry_state': False}), dirs['reset']
    ),
  }
  train.train_and_evaluate(rnn_config(corpus_dir, **{'train.stop_at': 80}), dirs['split'])
  results['split'] = train.train_and_evaluate(rnn_config(corpus_dir), dirs['split'])
  return dirs, results


@pytest.mark.slow
def test_carried_state_beats_resetting_every_batch(lstm_runs):
  _, results = lstm_runs
  carried, reset = results['carried'], results['reset']
  assert carried['loss'] < carried['unigram_entropy'] - 0.7
  # Unrolled over 8 characters only, the carried state is most of the context.
  assert carried['perplexity'] < 0.95 * reset['perplexity']


@pytest.mark.slow
def test_resume_with_carried_state_is_exact(lstm_runs):
  import orbax.checkpoint as ocp

  dirs, results = lstm_runs
  assert results['split']['loss'] == results['carried']['loss']

  def state_at(workdir):
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(f'{checkpoint.directory(workdir)}/160/state')

  whole, split = state_at(dirs['carried']), state_at(dirs['split'])
  assert np.asarray(whole['carry']).shape == (1, 2, 16, 128)  # the carry is checkpointed
  assert np.abs(np.asarray(whole['carry'])).max() > 0.01
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sample_command_generates_from_a_recurrent_model(lstm_runs):
  dirs, _ = lstm_runs
  command = [
    sys.executable,
    '-m',
    'lmjax.sample',
    '--workdir',
    dirs['carried'],
    '--prompt',
    'ROMEO:',
    '--max_new_tokens',
    '40',
    '--temperature',
    '0',
    '--num_samples',
    '2',
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  samples = result.stdout.split('--- sample ')[1:]
  assert len(samples) == 2 and samples[0] == samples[1].replace('1 (step', '0 (step')  # greedy
  assert samples[0].split('---\n', 1)[1].startswith('ROMEO:')


@pytest.mark.slow
@pytest.mark.parametrize('family', ['rnn', 'gru'])
def test_rnn_and_gru_learn_characters(corpus_dir, tmp_path, family):
  result = train.train_and_evaluate(
    rnn_config(
      corpus_dir,
      **{'model.family': family, 'train.num_steps': 120, 'train.eval_every': 0, 'data.seq_len': 16},
    ),
    str(tmp_path),
  )
  assert result['loss'] < result['unigram_entropy'] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize('family', recurrent.CELLS)
def test_every_family_learns_words(corpus_dir, tmp_path, family):
  config = rnn_config(
    corpus_dir,
    **{
      'model.family': family,
      'tokenizer.kind': 'words',
      'tokenizer.min_count': 3,
      'data.append_eos': False,
      'data.seq_len': 16,
      'train.eval_every': 0,
      # The tanh RNN wants gentler, more steps than the gated cells.
      'train.num_steps': 200 if family == 'rnn' else 100,
      'optimizer.learning_rate': 2e-3 if family == 'rnn' else 5e-3,
    },
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['loss'] < result['unigram_entropy'] - 0.3
  assert math.isfinite(result['perplexity'])
