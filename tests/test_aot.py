"""Ahead-of-time compilation for Cloud TPU slices on this CPU machine (lmjax.aot,
through libtpu): the real train step and decode loop, the TPU compiler's per-chip
memory and FLOPs, and the launcher's refusal of a job that cannot fit."""

import subprocess
import sys

import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import aot
from lmjax import config as config_lib


@pytest.mark.parametrize(
  'name,topology',
  [
    ('v4-8', 'v4:2x2x1'),
    ('v4-16', 'v4:2x2x2'),
    ('v4-32', 'v4:2x2x4'),
    ('v4-64', 'v4:2x4x4'),
    ('v5p-8', 'v5p:2x2x1'),
    ('v5litepod-1', 'v5e:1x1'),
    ('v5litepod-16', 'v5e:4x4'),
    ('v5litepod-256', 'v5e:16x16'),
    ('v6e-8', 'v6e:2x4'),
    ('V5E:2x2', 'v5e:2x2'),
  ],
)
def test_accelerator_types_name_their_topology(name, topology):
  assert aot.topology_name(name) == topology


@pytest.mark.parametrize('name', ['v4-6', 'v4-2', 'v3-8', 'tpu', 'v5e:2'])
def test_a_wrong_topology_is_a_clear_error(name):
  with pytest.raises(ValueError, match='--topology'):
    aot.topology_name(name)


@pytest.mark.parametrize(
  'topology,kind,hbm',
  [
    ('v5e:2x2', 'TPU v5 lite', 16.0),
    pytest.param('v4-8', 'TPU v4', 32.0, marks=pytest.mark.slow),
  ],
)
def test_tiny_config_compiles_for_a_tpu_slice(corpus_dir, topology, kind, hbm):
  overrides = {'mesh.data': 2, 'mesh.fsdp': 2, 'model.dtype': 'bfloat16', 'data.seq_len': 128}
  config = tiny_config(corpus_dir, **overrides, **{'model.num_layers': 3})
  report = aot.compile_report(config, topology)
  assert report['platform'] == 'tpu' and report['device_kind'] == kind and report['chips'] == 4
  assert report['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1}
  chip = report['per_chip']
  assert chip['hbm_gib'] == hbm and chip['fits'] is True
  assert 0 < chip['arguments_gib'] <= chip['peak_gib'] < hbm
  assert chip['margin_gib'] == pytest.approx(hbm - chip['peak_gib'], abs=1e-3)
  # fsdp=2 holds half of every parameter (the embedding's and the kernels' embed axis).
  assert chip['params_gib'] == pytest.approx(report['params'] * 4 / 2 / 2**30, rel=0.1)
  # The Pallas splash kernel lowered for the TPU: forward, and the dq and dkv backward.
  assert report['attention'] == 'splash' and report['tpu_custom_calls'] >= 3
  # Scanned blocks (3 > transformer.UNROLLED_SCAN_LAYERS, so a loop): the compiler
  # counts the loop's body once, so the step's FLOPs are the model's; looped, the
  # compiler's count agrees with 6N + attention per chip.
  assert report['flops_source'].startswith('model')
  assert report['flops_per_step'] == report['model_flops_per_step']
  assert report['compiler_flops_per_step'] < report['model_flops_per_step']
  assert report['step_s_estimate'] == pytest.approx(
    report['flops_per_step'] / report['peak_flops_per_chip'], rel=1e-3
  )
  assert report['decode']['per_chip']['fits'] is True


@pytest.mark.slow
def test_the_compilers_flops_of_blocks_in_line_agree_with_the_models(corpus_dir):
  """Blocks in the program's line (the loop, or a scan of up to
  transformer.UNROLLED_SCAN_LAYERS): the compiler counts them all, and its count
  agrees with 6N + attention per chip."""
  for scan in (False, True):
    overrides = {'mesh.data': 4, 'model.scan_layers': scan}
    report = aot.compile_report(tiny_config(corpus_dir, **overrides), 'v5e:2x2')
    assert report['flops_source'] == 'compiler'
    assert report['attention'] == 'xla' and report['tpu_custom_calls'] == 0  # 32 tokens
    assert 0.8 < report['flops_per_step'] / report['model_flops_per_step'] < 1.6


def test_a_job_too_large_for_the_chips_does_not_fit(corpus_dir):
  config = tiny_config(corpus_dir, **{'train.batch_size': 1 << 16, 'data.seq_len': 128})
  report = aot.compile_report(config, 'v5e:2x2')
  chip = report['per_chip']
  assert chip['fits'] is False and chip['margin_gib'] < 0


def test_libtpu_refuses_an_unknown_slice_clearly(corpus_dir):
  with pytest.raises(ValueError, match='v5e:3x3'):
    aot.compile_report(tiny_config(corpus_dir), 'v5e:3x3')


@pytest.mark.slow
@pytest.mark.parametrize('topology', ['v5e:2x2', 'v4:2x2x1'])
def test_gpt2_124m_compiles_for_tpu_slices(topology):
  config = config_lib.load_config_file(str(REPO / 'configs' / 'gpt2_124m.py'))
  report = aot.compile_report(config, topology)
  chip = report['per_chip']
  assert report['params'] > 124e6 and report['chips'] == 4
  assert chip['fits'] is True and chip['peak_gib'] > chip['params_gib'] * 3  # + Adam's moments
  assert report['flops_per_step'] == pytest.approx(report['model_flops_per_step'])  # remat dots
  assert report['attention'] == 'splash' and report['tpu_custom_calls'] >= 3
  assert report['decode']['per_chip']['fits'] is True


@pytest.mark.slow
def test_the_launcher_refuses_a_job_that_cannot_fit(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      'launch/tpu.py',
      'run',
      '--name',
      'lm',
      '--zone',
      'us-west4-a',
      '--accelerator',
      'v5litepod-4',
      '--',
      '--config',
      'configs/default.py',
      '--workdir',
      str(tmp_path / 'run'),
      '--config.train.batch_size=32768',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode != 0
  assert 'GiB a chip and v5e:2x2 (TPU v5 lite) chips hold 16.0 GiB' in result.stderr
  assert '--skip_fit_check' in result.stderr and 'gcloud' not in result.stdout
