"""Attention: one function, one kernel per platform. The Pallas splash kernel (TPU)
runs here in Pallas' interpret mode and must equal the reference formulation,
in value and gradient: causal, packed rows, grouped-query, bidirectional, and
sharded over a mesh (shard_map)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import models
from lmjax import sharding
from lmjax import steps
from lmjax.models import layers

LENGTH = 384  # three 128-token splash blocks: block skipping under the causal mask is exercised


def qkv(batch=2, heads=4, kv_heads=4, head_dim=32, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda h: jnp.asarray(rng.normal(size=(batch, LENGTH, h, head_dim)), jnp.float32)
  return normal(heads), normal(kv_heads), normal(kv_heads)


def packed_segments(batch=2):
  """Three documents and padding (0) in the first row, two documents in the second."""
  first = [1] * 100 + [2] * 150 + [3] * 90 + [0] * 44
  second = [1] * 200 + [2] * 184
  return jnp.asarray([first, second][:batch] + [second] * (batch - 2), jnp.int32)


def value_and_grads(kernel, query, key, value, segment_ids, causal):
  def loss(q, k, v):
    out = layers.attention(q, k, v, segment_ids, causal, kernel)
    return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(query, key, value)
  return out, grads


@pytest.mark.parametrize(
  'causal,packed,kv_heads',
  [(True, False, 4), (True, True, 4), (True, True, 2), (False, True, 1)],
  ids=['causal', 'causal-packed', 'causal-packed-gqa', 'bidirectional-packed-mqa'],
)
def test_the_splash_kernel_equals_the_reference_attention(causal, packed, kv_heads):
  query, key, value = qkv(kv_heads=kv_heads)
  segments = packed_segments() if packed else None
  want, want_grads = value_and_grads('xla', query, key, value, segments, causal)
  got, got_grads = value_and_grads('splash', query, key, value, segments, causal)
  np.testing.assert_allclose(got, want, atol=2e-5)
  for name, g, w in zip(('query', 'key', 'value'), got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-4, err_msg=name)
  if packed:  # the test can fail: without segments, documents see each other
    unpacked, _ = value_and_grads('splash', query, key, value, None, causal)
    assert not np.allclose(unpacked[0, 100:250], want[0, 100:250], atol=1e-3)


def test_the_splash_kernel_runs_sharded_over_batch_and_heads():
  """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs in shard_map, each device
  on its rows and heads: the same values and gradients as the unsharded reference."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  query, key, value = qkv(batch=4, heads=4, kv_heads=2)
  segments = packed_segments(batch=4)
  want, want_grads = value_and_grads('xla', query, key, value, segments, True)
  spec = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor')
  )
  placed = [jax.device_put(x, spec) for x in (query, key, value)]
  with sharding.rules_and_mesh(mesh):
    got, got_grads = value_and_grads('splash', *placed, segments, True)
  assert got.sharding.spec[:3] == (('data', 'fsdp'), None, 'tensor')
  np.testing.assert_allclose(got, want, atol=2e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-4)


@pytest.mark.slow
def test_a_transformer_with_the_splash_kernel_has_the_reference_loss_and_gradients():
  """Scanned blocks, remat of the matmuls, RoPE and grouped-query attention: the
  kernel inside the model changes no number beyond rounding."""
  c = config_lib.base_config().model
  c.num_layers, c.num_heads, c.num_kv_heads, c.embed_dim = 3, 4, 2, 64
  c.positions, c.remat = 'rope', 'dots'
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 60, (2, LENGTH + 1)), jnp.int32)
  batch = {
    'inputs': tokens[:, :-1],
    'targets': tokens[:, 1:],
    'weights': jnp.ones((2, LENGTH), jnp.float32),
    'segment_ids': packed_segments(),
    'positions': jnp.asarray(np.zeros((2, LENGTH)), jnp.int32),  # set below
  }
  positions = np.zeros((2, LENGTH), np.int32)
  for row, ids in enumerate(np.asarray(batch['segment_ids'])):
    for segment in np.unique(ids):
      where = ids == segment
      positions[row, where] = np.arange(where.sum())
  batch['positions'] = jnp.asarray(positions)

  def loss(model, params):
    logits, _ = steps.apply_model(model, params, batch, deterministic=True)
    return steps.token_losses(logits, batch['targets'])[0].mean()

  results = {}
  for kernel in ('xla', 'splash'):
    c.attention = kernel
    model = models.build_model(c, 60, LENGTH)
    params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))['params']
    results[kernel] = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(params)
  (value, grads), (want, want_grads) = results['splash'], results['xla']
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_each_platform_gets_its_kernel():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert layers.attention_kernel('auto', 'tpu', bf16, 1024, 64) == 'splash'
  assert layers.attention_kernel('auto', 'tpu', f32, 1000, 64) == 'xla'  # not whole blocks
  assert layers.attention_kernel('auto', 'gpu', bf16, 1000, 64) == 'cudnn'
  assert layers.attention_kernel('auto', 'gpu', f32, 1024, 64) == 'xla'  # cuDNN: 16-bit only
  assert layers.attention_kernel('auto', 'gpu', bf16, 1024, 256) == 'xla'  # head too wide
  assert layers.attention_kernel('auto', 'cpu', bf16, 1024, 64) == 'xla'
  assert layers.attention_kernel('splash', 'cpu', f32, 1024, 64) == 'splash'  # interpreted
  with pytest.raises(ValueError, match=r"model.attention='flash': choose one of \('auto'"):
    layers.attention_kernel('flash', 'tpu', bf16, 1024, 64)


def test_a_kernel_the_shapes_or_platform_cannot_take_is_a_clear_error():
  query, key, value = qkv()
  with pytest.raises(ValueError, match='needs a GPU; this program is for cpu'):
    layers.attention(query, key, value, kernel='cudnn')
  with pytest.raises(ValueError, match='multiple of 128, got 100: set data.seq_len'):
    layers.attention(query[:, :100], key[:, :100], value[:, :100], kernel='splash')
