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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, '
                     f'but {num_devices} are present')
  return tuple(sizes)


def cpu_device_count(config, cores: int) -> int:
  """How many XLA devices to split a CPU host of `cores` cores into.

  XLA:CPU runs the many small operations of a Transformer step one at a time,
  so one device leaves all but one core mostly idle; one device per core, in
  data parallel, keeps them all busy (measured: the shakespeare_char step
  57 -> 40 ms on 2 cores). A recurrent model's step is a few large matmuls that
  already use every core, and splitting its batch only slows it (85 -> 96 ms).
  The count is `config.cpu_devices` when set; the product of an explicit mesh;
  otherwise the largest count up to `cores` that divides both batch sizes.
  """
  if config.cpu_devices:
    return int(config.cpu_devices)
  sizes = [int(config.mesh[axis]) for axis in MESH_AXES]
  if -1 not in sizes:
    return math.prod(sizes)
  from lmjax.models import recurrent
  count = 1 if config.model.family in recurrent.CELLS else max(1, cores)
  while count > 1 and (config.train.batch_size % count or config.train.eval_batch_size % count):
    count -= 1
  return count


def split_cpu_host(config, multi_process: bool = False) -> int | None:
  """Splits the CPU backend into `cpu_device_count` devices (via XLA_FLAGS, before
  JAX starts its backends). Leaves alone an explicit
  --xla_force_host_platform_device_count, multi-process runs (whose launchers
  choose), and a backend that has already started. Returns the count set, if any."""
  import os

  from jax._src import xla_bridge
  flags = os.environ.get('XLA_FLAGS', '')
  if ('xla_force_host_platform_device_count' in flags or multi_process
      or xla_bridge.backends_are_initialized()):
    return None
  count = cpu_device_count(config, len(os.sched_getaffinity(0)))
  if count > 1:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()
  return count


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
    raise ValueError(f'{what}={global_batch} must be divisible by the {shards} data-parallel '
                     f'shards (mesh data x fsdp) and the {jax.process_count()} processes')


def make_global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process' rows -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}
