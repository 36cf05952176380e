"""Transformer LM: loss at init, causality, learning, variants, sharded state."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from lmjax import config as config_lib
from lmjax import models
from lmjax import sample
from lmjax import sharding
from lmjax import steps
from lmjax import train_state
from lmjax.models import transformer


def model_config(**fields):
  c = config_lib.base_config().model
  c.num_layers, c.num_heads, c.embed_dim = 2, 2, 32
  for key, value in fields.items():
    c[key] = value
  return c


def batch_of(tokens):
  tokens = jnp.asarray(tokens, jnp.int32)
  return {
    'inputs': tokens[:, :-1],
    'targets': tokens[:, 1:],
    'weights': jnp.ones(tokens[:, 1:].shape, jnp.float32),
  }


def init_params(model, seq_len=16, seed=0):
  variables = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
  return jax.tree.map(
    lambda x: x.value if hasattr(x, 'value') else x,
    variables['params'],
    is_leaf=lambda x: hasattr(x, 'value'),
  )


@pytest.mark.parametrize('vocab', [67, 257, 1000])
def test_loss_at_init_is_about_log_vocab(vocab):
  model = models.build_model(model_config(), vocab, 16)
  params = init_params(model)
  tokens = np.random.default_rng(0).integers(0, vocab, (8, 17))
  loss, _ = steps.loss_fn(params, model, batch_of(tokens), None, True)
  assert abs(float(loss) - math.log(vocab)) < 0.05 * math.log(vocab)


@pytest.mark.parametrize(
  'fields',
  [
    {},
    {'positions': 'rope'},
    {'mlp': 'swiglu', 'norm': 'rmsnorm'},
    pytest.param({'tie_embeddings': False, 'vocab_multiple': 64}, marks=pytest.mark.slow),
    pytest.param({'dtype': 'bfloat16'}, marks=pytest.mark.slow),
  ],
)
def test_causal_no_token_sees_the_future(fields):
  model = models.build_model(model_config(**fields), 50, 16)
  params = init_params(model)
  tokens = np.random.default_rng(1).integers(0, 50, (2, 16))
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 7) % 50
  logits = model.apply({'params': params}, jnp.asarray(tokens))
  logits_changed = model.apply({'params': params}, jnp.asarray(changed))
  assert logits.shape == (2, 16, model.config.vocab_size)
  np.testing.assert_allclose(logits[:, :10], logits_changed[:, :10], atol=1e-5)
  assert not np.allclose(logits[:, 10:], logits_changed[:, 10:], atol=1e-3)


@pytest.mark.parametrize('positions', ['learned', 'rope'])
def test_packed_document_does_not_see_its_neighbour(positions):
  """A document's logits are the same whatever document is packed before it,
  and the same as when it is alone in a row (positions restart with it)."""
  model = models.build_model(model_config(positions=positions), 50, 16)
  params = init_params(model)
  rng = np.random.default_rng(2)
  document = rng.integers(0, 50, 9)
  rows, segments, positions_ = [], [], []
  for neighbour_len in (7, 7, 3):  # two different 7-token neighbours, one 3-token one
    neighbour = rng.integers(0, 50, neighbour_len)
    pad = 16 - neighbour_len - len(document)
    rows.append(np.concatenate([neighbour, document, np.zeros(pad, int)]))
    segments.append([1] * neighbour_len + [2] * len(document) + [0] * pad)
    positions_.append(list(range(neighbour_len)) + list(range(len(document))) + [0] * pad)
  alone = np.concatenate([document, np.zeros(7, int)])
  rows.append(alone)
  segments.append([1] * 9 + [0] * 7)
  positions_.append(list(range(9)) + [0] * 7)
  logits = model.apply(
    {'params': params},
    jnp.asarray(rows),
    positions=jnp.asarray(positions_),
    segment_ids=jnp.asarray(segments),
  )
  of_document = [logits[0, 7:16], logits[1, 7:16], logits[2, 3:12], logits[3, :9]]
  for other in of_document[1:]:
    np.testing.assert_allclose(other, of_document[0], atol=1e-5)
  # Without the mask the neighbour does leak in: the test can fail.
  unmasked = model.apply({'params': params}, jnp.asarray(rows), positions=jnp.asarray(positions_))
  assert not np.allclose(unmasked[0, 7:16], unmasked[1, 7:16], atol=1e-3)


def test_vocab_padding_rounds_up():
  assert models.padded_vocab_size(67, 64) == 128
  assert models.build_model(model_config(vocab_multiple=8), 257, 16).config.vocab_size == 264


def test_bad_model_settings_are_named():
  with pytest.raises(ValueError, match='not divisible by model.num_heads=3'):
    init_params(models.build_model(model_config(num_heads=3), 50, 16))
  with pytest.raises(ValueError, match="model.family 'mamba'"):
    models.build_model(model_config(family='mamba'), 50, 16)


def optimizer_config(**fields):
  c = config_lib.base_config().optimizer
  for key, value in fields.items():
    c[key] = value
  return c


def run_steps(model, opt, tokens, num_steps, mesh):
  tx, schedule = train_state.make_optimizer(opt, 100)
  seq_len = tokens.shape[1] - 1
  _, shardings = train_state.abstract_state(model, tx, seq_len, mesh)
  state = train_state.create_state(model, tx, seq_len, shardings, jax.random.key(0))
  step = jax.jit(
    functools.partial(steps.train_step, model=model, schedule=schedule, deterministic=True),
    donate_argnums=0,
  )
  batch = sharding.make_global_batch(jax.tree.map(np.asarray, batch_of(tokens)), mesh)
  losses = []
  with sharding.rules_and_mesh(mesh):
    for _ in range(num_steps):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics['loss_sum'] / metrics['weight_sum']))
  return losses, state


@pytest.mark.parametrize(
  'name',
  [
    n if n in ('adamw', 'adafactor') else pytest.param(n, marks=pytest.mark.slow)
    for n in train_state.OPTIMIZERS
  ],
)
def test_every_optimizer_lowers_the_loss_on_a_repeated_batch(name):
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  model = models.build_model(model_config(), 50, 16)
  tokens = np.random.default_rng(2).integers(0, 50, (8, 17))
  lr = {'sgd': 0.5, 'adafactor': 0.1}.get(name, 3e-3)  # adafactor scales by param RMS
  opt = optimizer_config(name=name, learning_rate=lr, warmup_steps=0, schedule='constant')
  losses, _ = run_steps(model, opt, tokens, 8, mesh)
  assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize('schedule', [s for s in train_state.SCHEDULES if s != 'epochs'])
def test_schedules_warm_up_to_the_peak_and_decay(schedule):  # 'epochs': see test_recurrent.py
  opt = optimizer_config(
    schedule=schedule, learning_rate=1e-3, warmup_steps=10, min_learning_rate=1e-4
  )
  fn = train_state.make_schedule(opt, 100)
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(5e-4)
  assert float(fn(10)) == pytest.approx(1e-3)
  end = float(fn(100))
  expected = {'constant': 1e-3, 'linear': 1e-4, 'cosine': 1e-4, 'rsqrt': 1e-3 * math.sqrt(10 / 100)}
  assert end == pytest.approx(expected[schedule], rel=1e-4)


def test_weight_decay_skips_norms_and_biases():
  model = models.build_model(model_config(), 50, 16)
  mask = train_state.decay_mask(init_params(model))
  assert mask['blocks']['attention']['qkv']['kernel']  # [layers, embed, 3, heads, kv]
  assert not mask['blocks']['attention_norm']['LayerNorm_0']['scale']  # [layers, embed]
  assert not mask['final_norm']['LayerNorm_0']['bias']
  loop = models.build_model(model_config(scan_layers=False), 50, 16)
  mask = train_state.decay_mask(init_params(loop))
  assert mask['block_0']['attention']['qkv']['kernel']
  assert not mask['block_0']['attention_norm']['LayerNorm_0']['scale']


@pytest.mark.slow
def test_state_is_created_sharded_on_a_2x2x2_mesh_and_trains_like_one_device():
  tokens = np.random.default_rng(3).integers(0, 50, (8, 17))
  model = models.build_model(model_config(), 50, 16)
  opt = optimizer_config(warmup_steps=0, schedule='constant')
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 2}))
  losses, state = run_steps(model, opt, tokens, 3, mesh)
  qkv = state.params['blocks']['attention']['qkv']['kernel']  # [layers, embed, 3, heads, kv]
  assert qkv.shape == (2, 32, 3, 2, 16)
  expected = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(None, 'fsdp', None, 'tensor')
  )
  assert qkv.sharding.is_equivalent_to(expected, qkv.ndim)
  assert {s.data.shape for s in qkv.addressable_shards} == {(2, 16, 3, 1, 16)}
  adam_mu = state.opt_state[1][0].mu['blocks']['attention']['qkv']['kernel']
  assert adam_mu.sharding.is_equivalent_to(expected, qkv.ndim)
  single = sharding.make_mesh(
    ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}), devices=jax.devices()[:1]
  )
  single_losses, _ = run_steps(model, opt, tokens, 3, single)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)


def test_mesh_shape_errors():
  config = ml_collections.ConfigDict({'data': 3, 'fsdp': 1, 'tensor': 1})
  with pytest.raises(ValueError, match='uses 3 devices, but 8 are present'):
    sharding.make_mesh(config)
  assert sharding.mesh_shape(
    ml_collections.ConfigDict({'data': -1, 'fsdp': 2, 'tensor': 1}), 8
  ) == (4, 2, 1)


def test_cpu_gelu_matches_flax_in_value_and_gradient():
  from lmjax.models import layers

  x = jax.random.normal(jax.random.key(0), (4, 8, 32)) * 3
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-6)
  ours = jax.grad(lambda v: jnp.sum(jnp.sin(layers.gelu(v))))(x)
  reference = jax.grad(lambda v: jnp.sum(jnp.sin(jax.nn.gelu(v, approximate=True))))(x)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(jax.jit(layers.materialize)(x), x)
  poisoned = x.at[0, 0, 0].set(jnp.nan)
  assert bool(jnp.all(jnp.isnan(jax.jit(layers.materialize)(poisoned))))


def test_grouped_query_attention_is_attention_over_repeated_key_value_heads():
  """A model with 2 key/value heads for 4 query heads equals, in loss and in
  gradient, the multi-head model whose key/value heads are those 2 repeated
  (as transformers' repeat_kv does); its decode cache holds 2 heads."""
  settings = dict(num_layers=1, num_heads=4, positions='rope', mlp='swiglu', norm='rmsnorm')
  gqa = models.build_model(model_config(num_kv_heads=2, **settings), 50, 16)
  mha = models.build_model(model_config(**settings), 50, 16)
  params = init_params(gqa)
  rng = np.random.default_rng(0)
  batch = batch_of(rng.integers(0, 50, (3, 17)))

  def repeated(p):
    p = jax.tree.map(lambda x: x, p)
    attention = dict(p['blocks']['attention'])  # scanned: a leading layers axis
    query = attention.pop('query')['kernel']  # [layers, embed, 4, hd]
    key_value = attention.pop('key_value')['kernel']  # [layers, embed, 2, 2, hd]
    kv = jnp.repeat(key_value, 2, axis=3)  # kv head k serves query heads 2k, 2k + 1
    attention['qkv'] = {'kernel': jnp.concatenate([query[:, :, None], kv], axis=2)}
    return {**p, 'blocks': {**p['blocks'], 'attention': attention}}

  def loss(model, p):
    logits, _ = steps.apply_model(model, p, batch, deterministic=True)
    losses, _ = steps.token_losses(logits, batch['targets'])
    return losses.mean()

  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, gqa)))(params)
  reference, reference_grads = jax.jit(
    jax.value_and_grad(lambda p: loss(mha, repeated(p)))  # back through the repeat
  )(params)
  np.testing.assert_allclose(value, reference, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The key/value cache is kv_heads wide.
  _, cache = jax.eval_shape(
    lambda p: gqa.apply(
      {'params': p},
      jnp.zeros((3, 1), jnp.int32),
      positions=jnp.zeros((3, 1), jnp.int32),
      decode=True,
      mutable=['cache'],
    ),
    params,
  )
  key_shape = cache['cache']['blocks']['attention']['key'].shape
  assert key_shape == (1, 3, 16, 2, 8)  # [layers, batch, cache, kv_heads, head_dim]


@pytest.mark.parametrize(
  'settings',
  [
    dict(remat='dots', positions='rope', mlp='swiglu', norm='rmsnorm', num_kv_heads=1),
    pytest.param(dict(), marks=pytest.mark.slow),
    pytest.param(dict(remat='full'), marks=pytest.mark.slow),
    dict(family='encoder', block='post_norm', bias=True, num_layers=2),  # unrolled
  ],
)
def test_scanned_blocks_compute_the_loop_of_blocks(settings):
  """model.scan_layers stacks every block's parameters on a leading axis under
  params['blocks']; the same weights, unstacked into block_0.., give the loop's
  loss and gradients, and the same decoded logits through the stacked cache.
  Three layers run as a loop in the program; two (transformer.UNROLLED_SCAN_LAYERS)
  in line, over the same stacked parameters."""
  settings = {'num_layers': 3, **settings}
  depth = settings['num_layers']
  scanned = models.build_model(model_config(**settings), 50, 16)
  loop = models.build_model(model_config(scan_layers=False, **settings), 50, 16)
  params = init_params(scanned)
  assert params['blocks']['mlp']['down']['kernel'].shape[0] == depth
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  unstacked = transformer.unstack_layers(flat, depth)
  assert set(traverse_util.flatten_dict(init_params(loop))) == set(unstacked)
  loop_params = traverse_util.unflatten_dict(unstacked)
  back = transformer.stack_layers(unstacked, depth)
  assert all(np.array_equal(back[path], flat[path]) for path in flat)
  batch = batch_of(np.random.default_rng(1).integers(0, 50, (2, 17)))

  def loss(model, p):
    logits, _ = steps.apply_model(model, p, batch, deterministic=True)
    return steps.token_losses(logits, batch['targets'])[0].mean()

  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, scanned)))(params)
  loop_value, loop_grads = jax.jit(jax.value_and_grad(functools.partial(loss, loop)))(loop_params)
  np.testing.assert_allclose(value, loop_value, rtol=1e-5)
  loop_grads = transformer.stack_layers(
    traverse_util.flatten_dict(jax.tree.map(np.asarray, loop_grads)), depth
  )
  for path, grad in traverse_util.flatten_dict(grads).items():
    np.testing.assert_allclose(grad, loop_grads[path], atol=1e-6, err_msg=str(path))
  if settings.get('family') == 'encoder':
    return
  prompt = np.array([3, 4, 5, 6, 7], np.int32)
  got = sample.generate(params, scanned, prompt, 6, vocab_size=50, temperature=0.0)
  want = sample.generate(loop_params, loop, prompt, 6, vocab_size=50, temperature=0.0)
  np.testing.assert_array_equal(got, want)
