"""Metric records (JSON lines + TensorBoard), FLOP counts and the peak they are
divided by: the vendor's dense peak on a known accelerator, the measured
matmul on CPU."""

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp

from lmjax import fs
from lmjax import models

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to WORKDIR/metrics.jsonl and
  writes the same scalars to TensorBoard (WORKDIR/tensorboard). Only the
  process that is given `enabled=True` (process 0) writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    self._summary = None
    if enabled:
      import tensorflow as tf  # tf.summary; TensorFlow is already loaded for tf.data.

      self._tf = tf
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with fs.open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    with self._summary.as_default(step=int(step)):
      for name, value in scalars.items():
        self._tf.summary.scalar(name, float(value))

  def close(self) -> None:
    if self._summary is not None:
      self._summary.flush()


def read_metrics(workdir: str) -> list[dict]:
  with fs.open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(sums: dict) -> dict:
  """Metric sums -> loss, perplexity, accuracy (and bits per byte if bytes were counted)."""
  weight = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / weight
  result = {
    'loss': loss,
    'perplexity': math.exp(min(loss, 80.0)),
    'accuracy': float(sums['correct_sum']) / weight,
    'tokens': float(sums['weight_sum']),
  }
  if 'byte_sum' in sums:
    num_bytes = max(float(sums['byte_sum']), 1.0)
    result['bits_per_byte'] = float(sums['loss_sum']) / math.log(2.0) / num_bytes
    result['bytes'] = float(sums['byte_sum'])
  return result


def flops_per_token(model, num_params: int, seq_len: int = 0) -> float:
  """Training FLOPs per token: 6 x matmul parameters + causal attention (PaLM's count)
  over `seq_len` tokens of context (0: the model's max_len).

  The learned position table is a lookup, not a matmul, so it is left out; so
  is a recurrent model's untied input embedding. A classifier counts as its
  backbone.
  """
  model = getattr(model, 'backbone', model)
  c = model.config
  if models.is_recurrent(model):
    lookup = 0 if c.tie_embeddings else c.vocab_size * c.embed_dim
    return 6.0 * (num_params - lookup)
  matmul_params = num_params - (c.max_len * c.embed_dim if c.positions == 'learned' else 0)
  attention = 12 * c.num_layers * (seq_len or c.max_len) * c.num_heads * c.attention_head_dim
  return 6.0 * matmul_params + attention


def step_flops(model, num_params: int, shapes: dict) -> tuple[int, float]:
  """(tokens, training FLOPs) of a step over a batch of `shapes` ({name:
  (shape, dtype)}, a task's batch_shapes). A decoder-only model or an encoder
  runs all its parameters on every token (`flops_per_token`); an
  encoder-decoder runs its encoder on the source tokens and its decoder (with
  the output projection) on the target tokens, and attends within each and
  from target to source."""
  rows, length = shapes['inputs'][0]
  if not models.is_encoder_decoder(model):
    return rows * length, flops_per_token(model, num_params, length) * rows * length
  c = model.config
  source = shapes['encoder_inputs'][0][1]
  sample = jnp.zeros((1, source), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), sample))['params']
  encoder, decoder = (models.count_params(params[name]) for name in ('encoder', 'decoder'))
  head = c.vocab_size * c.embed_dim  # the output projection (tied or not)
  width = 12 * c.num_layers * c.num_heads * c.attention_head_dim
  encoder_tokens, decoder_tokens = rows * source, rows * length
  flops = (6.0 * encoder + width * source) * encoder_tokens
  flops += (6.0 * (decoder + head) + width * (length + source)) * decoder_tokens
  return encoder_tokens + decoder_tokens, flops


@functools.cache
def measure_peak_flops(size: int = 1536, repeats: int = 4) -> float:
  """Peak f32 FLOP/s of this process' devices, from a large jitted matmul.

  Measured once per process on one device. On accelerators every local device
  has that peak; simulated CPU devices share the same cores, so there the
  single-device figure is the whole process' peak.
  """
  device = jax.local_devices()[0]
  matmul = jax.jit(lambda a, b: a @ b)
  x = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  best = 0.0
  for _ in range(2):  # The first round compiles and warms up.
    start = time.perf_counter()
    for _ in range(repeats):
      y = matmul(x, x)
    y.block_until_ready()
    best = max(best, 2.0 * size**3 * repeats / (time.perf_counter() - start))
  return best if device.platform == 'cpu' else best * jax.local_device_count()


# Dense matmul peak FLOP/s per chip, from the vendors' data sheets: (bfloat16,
# float32), matched against jax's `device_kind` in this order. TPUs: XLA runs
# float32 matmuls at its default precision as bfloat16 passes, so the float32
# column is the bfloat16 peak. NVIDIA: float32 is TF32 on the tensor cores,
# which XLA uses for float32 dots by default; the figures are SXM, without
# sparsity. MaxText and Levanter divide by the same bfloat16 figures.
VENDOR_PEAKS = (
  ('TPU v4', 275e12, 275e12),
  ('TPU v5 lite', 197e12, 197e12),  # v5e
  ('TPU v5e', 197e12, 197e12),
  ('TPU v5', 459e12, 459e12),  # v5p
  ('TPU v6 lite', 918e12, 918e12),  # v6e (Trillium)
  ('TPU v6e', 918e12, 918e12),
  ('H200', 989.4e12, 494.7e12),
  ('H100', 989.4e12, 494.7e12),
  ('A100', 312e12, 156e12),
)


# High-bandwidth memory per chip in GiB, from the same data sheets (an A100 is
# the 40 GB part unless its device_kind says 80GB), matched in this order.
CHIP_MEMORY_GIB = (
  ('TPU v4', 32),
  ('TPU v5 lite', 16),
  ('TPU v5e', 16),
  ('TPU v5', 95),
  ('TPU v6 lite', 32),
  ('TPU v6e', 32),
  ('H200', 141),
  ('H100', 80),
  ('A100-SXM4-80GB', 80),
  ('A100 80GB', 80),
  ('A100', 40),
)


def chip_memory_gib(device_kind: str) -> float | None:
  """One chip's HBM (GiB), or None for a device not in CHIP_MEMORY_GIB."""
  for name, gib in CHIP_MEMORY_GIB:
    if name.lower() in device_kind.lower():
      return float(gib)
  return None


def vendor_peak(device_kind: str, dtype: str = 'float32') -> float | None:
  """One chip's dense peak for a compute dtype ('bfloat16' / 'float16' use the
  16-bit column), or None for a device not in VENDOR_PEAKS (a CPU)."""
  for name, half, single in VENDOR_PEAKS:
    if name.lower() in device_kind.lower():
      return half if str(dtype) in ('bfloat16', 'float16') else single
  return None


def peak_flops(dtype: str = 'float32') -> tuple[float, str]:
  """(FLOP/s of this process' devices, 'vendor' or 'measured'): the vendor's
  peak times the local chips on a known accelerator, else `measure_peak_flops`."""
  devices = jax.local_devices()
  peak = vendor_peak(devices[0].device_kind, dtype)
  if peak is not None:
    return peak * len(devices), 'vendor'
  return measure_peak_flops(), 'measured'


def hardware_flops_ratio(remat: str) -> float:
  """Hardware FLOPs over model FLOPs: full rematerialisation runs each block's
  forward pass twice (8 instead of 6 FLOPs per parameter and token); 'dots'
  keeps the matmuls, so only cheap elementwise work is recomputed."""
  return 8.0 / 6.0 if remat == 'full' else 1.0
