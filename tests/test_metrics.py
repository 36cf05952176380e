"""Metric arithmetic: sums to loss, perplexity, accuracy and bits per byte; FLOP counts."""

import math

import pytest

from lmjax import config as config_lib
from lmjax import metrics
from lmjax import models


def test_summarize_turns_sums_into_means():
  sums = {'loss_sum': 200.0, 'correct_sum': 30.0, 'weight_sum': 100.0, 'byte_sum': 250.0}
  result = metrics.summarize(sums)
  assert result['loss'] == pytest.approx(2.0)
  assert result['perplexity'] == pytest.approx(math.exp(2.0))
  assert result['accuracy'] == pytest.approx(0.3)
  # 200 nats over 250 bytes: 200 / ln 2 / 250 bits per byte.
  assert result['bits_per_byte'] == pytest.approx(200.0 / math.log(2.0) / 250.0)
  assert result['tokens'] == 100 and result['bytes'] == 250


def test_flops_per_token_counts_matmul_parameters_and_attention():
  c = config_lib.base_config().model
  model = models.build_model(c, 257, 128)
  params = 1_000_000
  learned = metrics.flops_per_token(model, params)
  assert learned == 6 * (params - 128 * 128) + 12 * 4 * 128 * 128
  c.positions = 'rope'
  rope = metrics.flops_per_token(models.build_model(c, 257, 128), params)
  assert rope == 6 * params + 12 * 4 * 128 * 128
  # An imported GPT-2 keeps its 1,024-row position table but trains on 128 tokens:
  # the table is left out whole, and attention counts the context trained on.
  c.positions, c.max_len = 'learned', 1024
  imported = metrics.flops_per_token(models.build_model(c, 257, 128), params, seq_len=128)
  assert imported == 6 * (params - 1024 * 128) + 12 * 4 * 128 * 128


def test_metric_writer_appends_json_lines(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(5, {'train/loss': 2.5})
  writer.write(10, {'train/loss': 2.0, 'eval/loss': 2.2})
  writer.close()
  again = metrics.MetricWriter(str(tmp_path))
  again.write(15, {'train/loss': 1.5})
  records = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [5, 10, 15]
  assert records[1] == {'step': 10, 'train/loss': 2.0, 'eval/loss': 2.2}
  # TensorBoard's event files hold the same scalars at the same steps.
  assert tensorboard_scalars(tmp_path / 'tensorboard') == {
    ('train/loss', 5): 2.5,
    ('train/loss', 10): 2.0,
    ('eval/loss', 10): 2.2,
    ('train/loss', 15): 1.5,
  }


def tensorboard_scalars(directory) -> dict:
  """{(tag, step): value} of every scalar in the event files under `directory`."""
  import pathlib

  import tensorflow as tf

  scalars = {}
  for path in sorted(pathlib.Path(directory).rglob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = round(float(tf.make_ndarray(value.tensor)), 6)
  return scalars


def test_mfu_divides_by_the_vendors_peak_on_known_chips_and_the_measured_one_on_cpu():
  assert metrics.vendor_peak('TPU v4', 'bfloat16') == 275e12
  assert metrics.vendor_peak('TPU v5 lite', 'bfloat16') == 197e12  # v5e's device_kind
  assert metrics.vendor_peak('TPU v5', 'bfloat16') == 459e12  # v5p's
  assert metrics.vendor_peak('TPU v6 lite', 'float32') == 918e12
  assert metrics.vendor_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4e12
  assert metrics.vendor_peak('NVIDIA H200', 'float32') == 494.7e12
  assert metrics.vendor_peak('NVIDIA A100-SXM4-80GB', 'float32') == 156e12
  assert metrics.vendor_peak('cpu', 'float32') is None
  peak, source = metrics.peak_flops('float32')  # this machine: CPU devices
  assert source == 'measured' and peak == metrics.measure_peak_flops() > 0
  assert metrics.hardware_flops_ratio('full') == 8 / 6 and metrics.hardware_flops_ratio('dots') == 1
