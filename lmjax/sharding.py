"""Meshes, logical axis rules and host-local -> global arrays.

Models name the axes of every parameter and activation logically
(`batch, length, embed, heads, kv, mlp, vocab`); `LOGICAL_RULES` maps those
names onto the mesh axes `('data', 'fsdp', 'tensor')`. Changing the
parallelism of a run is changing `config.mesh`, never the model.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_RULES = (
  ('batch', ('data', 'fsdp')),
  ('length', None),
  ('embed', 'fsdp'),
  ('qkv', None),
  ('heads', 'tensor'),
  ('kv', None),
  ('mlp', 'tensor'),
  ('vocab', 'tensor'),
  ('gates', None),  # recurrent models: gate axis of a cell's kernels
  ('hidden', None),  # recurrent models: hidden units (outputs)
  ('hidden_in', 'fsdp'),  # recurrent models: hidden units (inputs of W_hh)
  ('classes', None),  # classifier head: output classes
  ('types', None),  # BERT's token-type embedding rows
  ('layers', None),  # scanned Transformer blocks: the stacked layer axis
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `num_devices`; one axis may be -1 (the remaining devices)."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f'mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, '
      f'but {num_devices} are present'
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


@contextlib.contextmanager
def rules_and_mesh(mesh: Mesh | None):
  """Context in which models' logical constraints resolve onto `mesh` (None: the
  pmap path, where each device runs its own program: no rules, so flax's
  constraints are no-ops)."""
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
      stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    yield


def logical_to_sharding(logical_specs, mesh: Mesh):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over the data-parallel axes, all else replicated."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_size_check(global_batch: int, mesh: Mesh, what: str = 'train.batch_size') -> None:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % shards or global_batch % jax.process_count():
    raise ValueError(
      f'{what}={global_batch} must be divisible by the {shards} data-parallel '
      f'shards (mesh data x fsdp) and the {jax.process_count()} processes'
    )


def make_global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process' rows -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {
    name: jax.make_array_from_process_local_data(sharding, value)
    for name, value in local_batch.items()
  }


def host_copy(tree):
  """Numpy copies of a tree of replicated (or pmap-replicated) arrays, from this
  host's first shard of each."""

  def first(x):
    if x is None or not hasattr(x, 'addressable_shards'):
      return x
    data = np.asarray(x.addressable_shards[0].data)
    return data.reshape(x.shape[1:]) if data.shape != x.shape else data

  return jax.tree.map(first, tree)
