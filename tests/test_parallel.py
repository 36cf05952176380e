"""Parallelism on 8 simulated CPU devices: every layout takes the same step, sharding
is real, gradient accumulation, pmap, remat, ahead-of-time memory, resharding restore."""

import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import derived
from lmjax import models
from lmjax import sharding
from lmjax import steps
from lmjax import train
from lmjax import train_state

SEQ_LEN, BATCH, STEPS = 16, 16, 5


def model_config(**fields):
  c = config_lib.base_config()
  c.model.num_layers, c.model.num_heads, c.model.embed_dim = 2, 8, 64
  c.model.vocab_multiple = 8  # tensor=8 splits the vocabulary too
  # SGD with momentum: Adam's 1/sqrt(v) would amplify float32 summation-order noise in
  # near-zero gradients, and these tests compare layouts to 1e-5.
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum = 'sgd', 0.5, 0.9
  c.optimizer.warmup_steps, c.optimizer.schedule = 0, 'constant'
  for key, value in fields.items():
    node = c
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def batches():
  """Two batches, alternating: the loss on the first must fall by the fifth step."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):
    window = rng.integers(0, 60, (BATCH, SEQ_LEN + 1)).astype(np.int32)
    out.append(
      {
        'inputs': window[:, :-1],
        'targets': window[:, 1:],
        'weights': (rng.random((BATCH, SEQ_LEN)) > 0.1).astype(np.float32),
      }
    )
  return [out[i % 2] for i in range(STEPS)]


def run(mesh_shape=(8, 1, 1), devices=None, **fields):
  """STEPS steps of the tiny Transformer; returns (losses, params on the host, state)."""
  config = model_config(**fields)
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, mesh_shape))), devices
  )
  model = models.build_model(config.model, 60, SEQ_LEN)
  tx, schedule = train_state.make_optimizer(config.optimizer, 100)
  _, shardings = train_state.abstract_state(model, tx, SEQ_LEN, mesh)
  state = train_state.create_state(model, tx, SEQ_LEN, shardings, jax.random.key(0))
  state, step = steps.build_train_step(config, model, schedule, state, shardings, mesh)
  losses = []
  for batch in batches():  # one loop for both paths: the step places the batch
    state, metrics = step(state, step.place(batch), jax.random.key(1))
    losses.append(float(metrics['loss_sum'] / metrics['weight_sum']))
  state = step.global_state(state)  # global arrays on the mesh, whatever the path
  return losses, jax.device_get(state.params), state


LSTM = {'model.family': 'lstm', 'model.hidden_dim': 64}  # data / fsdp for recurrent models


@pytest.fixture(scope='module')
def reference():
  return run(devices=jax.devices()[:1], mesh_shape=(1, 1, 1))


@pytest.fixture(scope='module')
def lstm_reference():
  return run(devices=jax.devices()[:1], mesh_shape=(1, 1, 1), **LSTM)


@pytest.mark.parametrize(
  'layout',
  [
    {'mesh_shape': (8, 1, 1)},
    pytest.param({'mesh_shape': (2, 4, 1)}, marks=pytest.mark.slow),
    {'mesh_shape': (2, 2, 2)},
    {'mesh_shape': (1, 1, 8)},
    pytest.param({'mesh_shape': (8, 1, 1), 'train.microbatches': 4}, marks=pytest.mark.slow),
    {'mesh_shape': (2, 4, 1), 'train.microbatches': 2},
    {'parallelism': 'pmap'},
    pytest.param({'mesh_shape': (8, 1, 1), 'model.remat': 'full'}, marks=pytest.mark.slow),
    {'mesh_shape': (2, 4, 1), 'model.remat': 'dots'},
    {'mesh_shape': (8, 1, 1), **LSTM},
    pytest.param({'mesh_shape': (2, 4, 1), **LSTM}, marks=pytest.mark.slow),
  ],
  ids=lambda layout: '-'.join(f'{k}={v}' for k, v in layout.items()),
)
def test_every_layout_takes_the_single_device_steps(reference, lstm_reference, layout):
  losses, params, _ = run(**layout)
  ref_losses, ref_params, _ = lstm_reference if 'model.family' in layout else reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[4] < losses[2] < losses[0]  # it trains
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def per_device_bytes(tree, device):
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def test_fsdp_shards_parameters_and_optimizer_state():
  _, _, replicated_state = run(mesh_shape=(8, 1, 1))
  _, _, fsdp_state = run(mesh_shape=(2, 4, 1))
  device = jax.devices()[0]
  qkv = fsdp_state.params['blocks']['attention']['qkv']['kernel']  # [layers, embed, 3, heads, kv]
  assert {shard.data.shape for shard in qkv.addressable_shards} == {(2, 16, 3, 8, 8)}
  full = per_device_bytes((replicated_state.params, replicated_state.opt_state), device)
  sharded = per_device_bytes((fsdp_state.params, fsdp_state.opt_state), device)
  assert 3.5 < full / sharded <= 4.0


def test_microbatches_must_divide_the_batch():
  with pytest.raises(ValueError, match='train.microbatches=3 does not divide the 16 rows'):
    run(mesh_shape=(8, 1, 1), **{'train.microbatches': 3})


def test_unknown_parallelism_and_remat_are_named():
  with pytest.raises(ValueError, match="parallelism must be 'mesh' or 'pmap'; got 'pjit'"):
    run(parallelism='pjit')
  with pytest.raises(ValueError, match='model.remat must be one of none, full, dots'):
    run(**{'model.remat': 'some'})


def test_checkpoint_restores_under_another_mesh(tmp_path):
  """Written with fsdp=4 on 8 devices, restored on (data=8) and on one device."""
  _, params, state = run(mesh_shape=(2, 4, 1))
  config = model_config()
  manager = checkpoint.manager(str(tmp_path), config.checkpoint)
  record = derived.Derived(vocab_size=60, steps_per_epoch=1, num_steps=100)
  checkpoint.save(manager, STEPS, state, {'model': 'tiny'}, record, {'kind': 'test'})
  manager.wait_until_finished()
  model = models.build_model(config.model, 60, SEQ_LEN)
  tx, _ = train_state.make_optimizer(config.optimizer, 100)
  for devices, shape in ((None, (8, 1, 1)), (jax.devices()[:1], (1, 1, 1))):
    mesh = sharding.make_mesh(
      ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices
    )
    abstract, _ = train_state.abstract_state(model, tx, SEQ_LEN, mesh)
    restored = checkpoint.restore_state(manager, STEPS, abstract)
    kernel = restored.params['blocks']['attention']['qkv']['kernel']
    assert kernel.sharding.mesh.shape == mesh.shape
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params), strict=True):
      np.testing.assert_array_equal(np.asarray(got), want)
  manager.close()


@pytest.mark.slow
def test_compile_only_reports_per_device_memory():
  command = [
    sys.executable,
    '-m',
    'lmjax.train',
    '--config',
    'configs/default.py',
    '--compile_only',
    '--config.mesh.data=2',
    '--config.mesh.fsdp=4',
  ]
  env = {**__import__('os').environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1} and report['chips'] == 8
  assert report['platform'] == 'cpu' and report['topology'] is None
  memory = report['per_chip']
  assert memory['temporaries_gib'] > 0 and memory['arguments_gib'] > memory['params_gib'] > 0
  assert memory['hbm_gib'] is None and 'fits' not in memory  # a CPU has no HBM to fit
  # fsdp=4 holds a quarter of the parameters per device.
  assert memory['params_gib'] == pytest.approx(report['params'] * 4 / 4 / 2**30, rel=0.05)


@pytest.mark.slow
def test_pmap_run_trains_checkpoints_and_evaluates_like_the_mesh_run(corpus_dir, tmp_path):
  from conftest import tiny_config

  overrides = {
    'train.num_steps': 20,
    'train.eval_every': 10,
    'checkpoint.every': 10,
    'sample.max_new_tokens': 5,
  }
  mesh_run = train.train_and_evaluate(tiny_config(corpus_dir, **overrides), str(tmp_path / 'm'))
  pmap_run = train.train_and_evaluate(
    tiny_config(corpus_dir, parallelism='pmap', **overrides), str(tmp_path / 'p')
  )
  np.testing.assert_allclose(pmap_run['loss'], mesh_run['loss'], rtol=1e-4)
  manager = checkpoint.manager(str(tmp_path / 'p'), read_only=True)
  assert sorted(manager.all_steps()) == [10, 20]
  with pytest.raises(ValueError, match="parallelism='pmap' does not carry recurrent state"):
    train.train_and_evaluate(
      tiny_config(
        corpus_dir,
        parallelism='pmap',
        **{**overrides, 'model.family': 'lstm', 'data.layout': 'stream'},
      ),
      str(tmp_path / 'r'),
    )
