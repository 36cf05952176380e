"""Ahead-of-time compilation: will a config fit, and how fast could it run, on
the devices it is meant for, before any of them is rented?

`compile_report(config, topology)` compiles the real train step (the one
`steps.make_train_step` gives a run) and the decode loop from shapes alone, for
this machine's devices or, with `topology`, for a Cloud TPU slice's devices,
which libtpu describes on any machine (`pip install 'lmjax[aot]'`):

    python -m lmjax.train --config configs/tpu/v5e_16.py --compile_only --topology v5e:4x4

It reports the TPU compiler's per-chip memory, whether it fits the chip's HBM,
the compiler's FLOPs per step and a roofline step time from the chip's peak.
"""

import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import metrics
from lmjax import models
from lmjax import sample
from lmjax import sharding
from lmjax import steps
from lmjax import tasks
from lmjax import train_state
from lmjax import validation
from lmjax.models import layers
from lmjax.models import transformer

TOPOLOGY_HELP = (
  "a TPU slice as generation:chips ('v4:2x2x1', 'v5e:4x4', 'v5p:2x2x2', 'v6e:2x2') "
  "or as a Cloud TPU accelerator type ('v4-8', 'v5litepod-16', 'v5p-8', 'v6e-4')"
)
# Chips of a TensorCore count: v4 and v5p accelerator types count 2 cores a chip.
_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
_GENERATIONS = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e'}
_ACCELERATOR_PREFIX = {'v5e': 'v5litepod'}  # the accelerator type's name, where it differs


def topology_name(name: str) -> str:
  """'generation:AxBxC' for a topology or an accelerator type ('v4-32' -> 'v4:2x4x4')."""
  name = name.strip().lower()
  if re.fullmatch(r'v(4|5e|5p|6e):\d+(x\d+){1,2}', name):
    return name
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v5lite|v6e|v6litepod)-(\d+)', name)
  if not match:
    raise ValueError(f'--topology {name!r} is not {TOPOLOGY_HELP}')
  generation = _GENERATIONS.get(match.group(1), match.group(1))
  count = int(match.group(2))
  chips = count // _CORES_PER_CHIP[generation]
  three_d = generation in ('v4', 'v5p')
  if chips < 1 or chips & (chips - 1) or (three_d and chips < 4):
    raise ValueError(f'--topology {name!r}: {count} is not a slice size of {generation}')
  grid = [2, 2, 1] if three_d else [1, 1]
  while math.prod(grid) < chips:  # grow the last of the shortest sides: 2x2x1, 2x2x2, 2x2x4, 2x4x4
    shortest = min(grid)
    grid[max(i for i, side in enumerate(grid) if side == shortest)] *= 2
  return f'{generation}:{"x".join(map(str, grid))}'


def topology_devices(name: str) -> list:
  """The devices of a TPU slice, described by libtpu on any machine."""
  topology = topology_name(name)
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError(
      f"--topology {topology} needs libtpu, the TPU compiler: pip install 'lmjax[aot]' "
      "(or 'jax[tpu]')"
    )
  generation, grid = topology.split(':')
  if jax.config.jax_platforms == 'cpu':  # not on the slice: no metadata server to ask
    chips = math.prod(int(side) for side in grid.split('x'))
    accelerator = _ACCELERATOR_PREFIX.get(generation, generation)
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    # No chip is opened: other processes may compile with libtpu at the same time.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault(
      'TPU_ACCELERATOR_TYPE', f'{accelerator}-{chips * _CORES_PER_CHIP[generation]}'
    )
  from jax.experimental import topologies  # noqa: PLC0415 (only with libtpu)

  chip_config = 'megacore' if generation in ('v4', 'v5p') else 'default'  # a device a chip
  try:
    description = topologies.get_topology_desc(
      platform='tpu', topology_name=topology, chip_config_name=chip_config
    )
  except Exception as error:  # libtpu's own error types
    raise ValueError(f'--topology {topology}: libtpu refused it: {str(error)[:300]}') from None
  return list(description.devices)


def _gib(n: float) -> float:
  return round(n / 2**30, 4)


def _per_chip_bytes(tree) -> int:
  return int(
    sum(
      np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for leaf in jax.tree.leaves(tree)
    )
  )


def memory_report(compiled, hbm_gib: float | None) -> dict:
  """The compiler's per-chip figures in GiB and whether they fit `hbm_gib`
  (peak = arguments + outputs + temporaries - what the outputs alias)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return {}
  peak = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  report = {
    'arguments_gib': _gib(memory.argument_size_in_bytes),
    'outputs_gib': _gib(memory.output_size_in_bytes),
    'temporaries_gib': _gib(memory.temp_size_in_bytes),
    'aliased_gib': _gib(memory.alias_size_in_bytes),
    'peak_gib': _gib(peak),
    'hbm_gib': hbm_gib,
  }
  if hbm_gib is not None:
    report['fits'] = bool(peak <= hbm_gib * 2**30)
    report['margin_gib'] = round(hbm_gib - peak / 2**30, 4)  # negative: short by this much
  return report


def _compile(lowered, hbm_gib):
  """(compiled program, None), or (None, the per-chip report) when the compiler
  refuses it for want of memory (the TPU compiler checks HBM itself)."""
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as error:
    message = str(error)
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
  report = {'fits': False, 'hbm_gib': hbm_gib, 'compiler': message.strip().splitlines()[0][:400]}
  match = re.search(r'required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM', message)
  if match:  # '... HLO temporaries (196.87G) exceeds available HBM (15.75G)'
    scale = 2 ** (10 * 'KMGT'.index(match.group(3)) + 10)
    report['required_gib'] = round(float(match.group(2)) * scale / 2**30, 4)
    if hbm_gib is not None:
      report['margin_gib'] = round(hbm_gib - report['required_gib'], 4)
  return None, report


def compiled_flops(compiled) -> float | None:
  """FLOPs of one run of the compiled (per-chip) program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _abstract(tree, sharding_):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_), tree)


def compile_report(config, topology: str = '') -> dict:
  """Lowers and compiles the train step and the decode loop for the configured
  mesh over this machine's devices (or a TPU `topology`'s), from shapes alone: no
  data, no parameters allocated. The vocabulary is 257 for bytes and
  tokenizer.vocab_size otherwise."""
  validation.check(config)
  devices = topology_devices(topology) if topology else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.batch_size_check(config.train.batch_size, mesh)
  task = tasks.get(config.task)
  vocab = 257 if config.tokenizer.kind == 'bytes' else config.tokenizer.vocab_size
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  record = task.from_shapes(config, vocab)
  model = task.build_model(config, record)
  tx, schedule = train_state.make_optimizer(
    config.optimizer, record.num_steps, record.steps_per_epoch
  )  # shapes only
  carry_rows = train_state.carry_rows(config, model)
  abstract, shardings = train_state.abstract_state(model, tx, seq_len, mesh, carry_rows)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    for name, (shape, dtype) in task.batch_shapes(config, batch_size).items()
  }
  rng = _abstract(jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated(mesh))
  kind = devices[0].device_kind
  hbm = metrics.chip_memory_gib(kind)
  start = time.perf_counter()
  step = steps.MeshStep(steps.make_train_step(config, model, schedule), shardings, mesh)
  compiled, refused = _compile(step.lower(abstract, batch, rng), hbm)
  compile_s = time.perf_counter() - start
  counted = compiled_flops(compiled) if compiled else None
  peak = metrics.vendor_peak(kind, config.model.dtype)
  shapes = task.batch_shapes(config, batch_size)
  _, model_flops = metrics.step_flops(model, models.count_params(abstract.params), shapes)
  model_flops = model_flops / len(devices)  # per chip
  # XLA's cost analysis counts a loop's body once, so for scanned blocks it sees
  # one layer: the step's FLOPs are then the model's, times what remat recomputes.
  backbone = getattr(model, 'backbone', model)  # a classifier's is its backbone's
  recurrent = models.is_recurrent(backbone)
  scanned = not recurrent and transformer.rolled_scan(backbone.config)
  attention = None
  if not recurrent:
    c = backbone.config
    attention = layers.attention_kernel(
      c.attention, devices[0].platform, c.dtype, seq_len, c.attention_head_dim
    )
  flops = model_flops * metrics.hardware_flops_ratio(config.model.remat) if scanned else counted
  report = {
    'platform': devices[0].platform,
    'device_kind': kind,
    'topology': topology_name(topology) if topology else None,
    'chips': len(devices),
    'mesh': dict(mesh.shape),
    'vocab_size': vocab,
    'params': models.count_params(abstract.params),
    'compile_s': round(compile_s, 2),
    'per_chip': {
      'params_gib': _gib(_per_chip_bytes(abstract.params)),
      'optimizer_state_gib': _gib(_per_chip_bytes(abstract.opt_state)),
      **(refused or memory_report(compiled, hbm)),
    },
    'flops_per_step': flops,  # per chip, remat included
    'flops_source': 'model x remat (scanned blocks)' if scanned else 'compiler',
    'compiler_flops_per_step': counted,  # a scanned loop's body counted once
    'model_flops_per_step': model_flops,  # per chip, 6N + attention
    'step_s_estimate': float(f'{flops / peak:.4g}') if flops and peak else None,
    'peak_flops_per_chip': peak,
    'attention': attention,  # the kernel (layers.attention_kernel)
    # Pallas (Mosaic) kernels in the compiled TPU program: the splash kernel lowered
    'tpu_custom_calls': compiled.as_text().count('custom_call_target="tpu_custom_call"')
    if compiled
    else None,
  }
  if task.generates_text and compiled:
    report['decode'] = _decode_report(config, model, mesh, hbm)
  return report


def _decode_report(config, model, mesh, hbm_gib, rows: int = 1) -> dict:
  """The sampling loop (`lmjax.sample`'s, key/value cache or carried state) for
  `rows` rows over the model's whole context (the end-of-training sample is one)."""
  total_len = model.config.max_len
  params = train_state.abstract_params(model, config.data.seq_len, mesh)
  replicated = sharding.replicated(mesh)
  buffer = jax.ShapeDtypeStruct((rows, total_len), jnp.int32, sharding=replicated)
  lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated)
  rng = _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
  start = time.perf_counter()
  with sharding.rules_and_mesh(mesh):
    lowered = sample.lower_stepwise(params, buffer, lengths, rng, model=model)
  compiled, refused = _compile(lowered, hbm_gib)
  return {
    'rows': rows,
    'length': total_len,
    'compile_s': round(time.perf_counter() - start, 2),
    'per_chip': refused or memory_report(compiled, hbm_gib),
  }
