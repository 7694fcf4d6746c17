"""The ready configs in configs/, run as their docstrings say, on a real sharded checkpoint."""

import json
import re

import numpy as np
from jax.sharding import PartitionSpec as P

import checkpoints
from jobs import REPO, ok, run_job, write_config
from surgery_job.cli import human

CONFIGS = REPO / 'configs'


def run_config(name: str, in_path, out, arg: str | None = None):
  config = CONFIGS / f'{name}.py'
  result = run_job(f'{config}:{arg}' if arg else config, f'--config.input.path={in_path}',
                   f'--config.output.path={out}')
  ok(result)
  step = 3 if (out / '3').exists() else None
  assert result.stdout.splitlines()[-1] == wrote_line(out / '3' if step else out)
  item_dir = out / '3' / 'default' if step else out
  return checkpoints.flat_numpy(checkpoints.restore_plain(item_dir)), checkpoints.saved_specs(item_dir)


def wrote_line(unit, what: str = 'Wrote') -> str:
  """The line that ends a run which committed (or found done) the output `unit`."""
  report = json.loads((unit / 'surgery_report.json').read_text())
  return (f"{what} {unit}: {len(report['leaves'])} leaves, {human(report['bytes_written'])}, "
          f'validated (report: {unit}/surgery_report.json)')


def test_every_config_documents_its_command():
  for path in CONFIGS.glob('*.py'):
    assert f'surgery-job --config=configs/{path.name}' in path.read_text(), path.name


def test_params_only_bf16(layered, tmp_path):
  in_path, x = layered
  got, _ = run_config('params_only_bf16', in_path, tmp_path / 'out')
  assert sorted(got) == sorted(k for k in x if k.startswith('params/') or k == 'step')
  assert all(v.dtype.name == 'bfloat16' for k, v in got.items() if k.startswith('params/'))
  np.testing.assert_array_equal(got['params/head/kernel'].astype(np.float32),
                                x['params/head/kernel'].astype(got['params/head/kernel'].dtype).astype(np.float32))


def test_vocab_resize(layered, tmp_path):
  in_path, x = layered
  got, specs = run_config('vocab_resize', in_path, tmp_path / 'out', '24')
  embedding = got['params/embed/embedding']
  assert embedding.shape == (24, 8) and specs['params/embed/embedding'] == P('model')
  np.testing.assert_array_equal(embedding[:16], x['params/embed/embedding'])
  np.testing.assert_allclose(embedding[16:], np.broadcast_to(x['params/embed/embedding'].mean(0), (8, 8)), rtol=1e-6)
  assert not np.any(got['opt_state/0/mu/embed/embedding'][16:])
  np.testing.assert_array_equal(got['opt_state/0/mu/embed/embedding'][:16], x['opt_state/0/mu/embed/embedding'])


def test_scan_then_unscan_is_the_identity(layered, tmp_path):
  in_path, x = layered
  scanned, specs = run_config('scan_layers', in_path, tmp_path / 'scanned')
  assert scanned['params/layers/mlp/kernel'].shape == (3, 8, 16)
  assert specs['opt_state/0/nu/layers/mlp/kernel'] == P(None, 'data', 'model')
  assert not any(re.search(r'layers_\d', k) for k in scanned)
  unscanned, specs = run_config('unscan_layers', tmp_path / 'scanned', tmp_path / 'unscanned')
  assert sorted(unscanned) == sorted(x)
  for key in x:
    np.testing.assert_array_equal(unscanned[key], x[key], err_msg=key)
  assert specs['params/layers_2/mlp/kernel'] == P('data', 'model')


def test_add_head(layered, tmp_path):
  in_path, _ = layered
  got, specs = run_config('add_head', in_path, tmp_path / 'out', 'cls,8,2')
  assert got['params/cls/kernel'].shape == (8, 2) and np.abs(got['params/cls/kernel']).max() <= 0.04
  assert np.any(got['params/cls/kernel'])
  assert not np.any(got['params/cls/bias'])
  assert not np.any(got['opt_state/0/mu/cls/kernel']) and not np.any(got['opt_state/0/nu/cls/bias'])
  assert specs['params/cls/kernel'] == P()


def test_fuse_qkv(layered, tmp_path):
  in_path, x = layered
  unfused = tmp_path / 'unfused'
  split = dict(op='split', source=r'(.*)/qkv/kernel', axis=1, sizes=[8, 8, 8],
               targets=[r'\1/query/kernel', r'\1/key/kernel', r'\1/value/kernel'])
  ok(run_job(write_config(tmp_path, {'transforms': [split]}), f'--config.input.path={in_path}',
             f'--config.output.path={unfused}'))
  got, specs = run_config('fuse_qkv', unfused, tmp_path / 'fused', '1')
  assert sorted(got) == sorted(x)
  for key in x:
    np.testing.assert_array_equal(got[key], x[key], err_msg=key)
  assert specs['params/layers_0/attn/qkv/kernel'] == P(None, 'model')


def test_scan_and_unscan_on_axis_1(layered, tmp_path):
  in_path, x = layered
  scanned, _ = run_config('scan_layers', in_path, tmp_path / 'scanned', 'layers,1')
  assert scanned['params/layers/mlp/kernel'].shape == (8, 3, 16)
  # Unscanning on the wrong axis would give each leaf another layer count: an error naming them.
  result = run_job(CONFIGS / 'unscan_layers.py', f'--config.input.path={tmp_path / "scanned"}',
                   f'--config.output.path={tmp_path / "wrong"}')
  assert result.returncode == 2 and 'do not agree on one layer count: 8 layers: layers/attn/qkv/kernel, ' \
      'layers/mlp/kernel; 16 layers: layers/mlp/bias' in result.stderr.strip().splitlines()[-1]
  unscanned, _ = run_config('unscan_layers', tmp_path / 'scanned', tmp_path / 'unscanned', 'layers,1')
  assert sorted(unscanned) == sorted(x)
  for key in x:
    np.testing.assert_array_equal(unscanned[key], x[key], err_msg=key)
