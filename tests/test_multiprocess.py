"""Several processes joined by jax.distributed on 127.0.0.1, started by launch/local.sh as on a
cluster: shards live on every process, and the output is read back by one plain-Orbax process."""

import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import checkpoints
from jobs import assert_unlocked, launch, ok, run_job, write_config
from test_ops import CASES, check_case


def run_two_processes(tmp_path, in_path, config: dict, **kwargs):
  out = tmp_path / 'out'
  result = launch(2, f'--config={write_config(tmp_path, config)}', f'--config.input.path={in_path}',
                  f'--config.output.path={out}', log_dir=tmp_path / 'logs', **kwargs)
  return out, result


@pytest.mark.parametrize('name', ['rename', 'pad_mean', 'stack', 'cast', 'drop_optimizer'])
def test_two_processes(name, two_process_checkpoint, tmp_path):
  transforms, extra, _, _ = CASES[name]
  in_path, x = two_process_checkpoint
  out, result = run_two_processes(tmp_path, in_path, {'transforms': transforms, **extra})
  ok(result)
  check_case(name, out / '3' / 'default', x)
  # What the user sees of process 0: none of the joining's own lines; its log keeps Gloo's.
  log = (tmp_path / 'logs' / 'process_0.log').read_text()
  for noise in ('[Gloo]', 'preemption service', 'distributed service'):
    assert noise not in result.stdout
  assert '[Gloo]' in log
  assert result.stdout.splitlines()[-1].startswith(f'Wrote {out}/3: ')


RESHARD = [dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2'),
           dict(op='add', path='new/kernel', shape=[8, 16], init='normal'),
           dict(op='pad', pattern='embed/embedding', axis=0, size=24, init='normal')]


def test_resharding_across_topologies_gives_identical_results(two_process_checkpoint, tmp_path):
  in_path, x = two_process_checkpoint
  config = write_config(tmp_path, {'transforms': RESHARD})
  one = tmp_path / 'one_process_two_devices'
  ok(run_job(config, f'--config.input.path={in_path}', f'--config.output.path={one}', devices=2))
  four = tmp_path / 'four_processes_one_device'
  ok(launch(4, f'--config={config}', f'--config.input.path={in_path}', f'--config.output.path={four}',
            log_dir=tmp_path / 'logs', devices_per_process=1))
  got_one = checkpoints.flat_numpy(checkpoints.restore_plain(one / '3' / 'default'))
  got_four = checkpoints.flat_numpy(checkpoints.restore_plain(four / '3' / 'default'))
  assert sorted(got_one) == sorted(got_four)
  for key in got_one:
    np.testing.assert_array_equal(got_one[key], got_four[key], err_msg=key)
  np.testing.assert_array_equal(got_four['params/embed/embedding'][:16], x['params/embed/embedding'])
  assert np.any(got_four['params/embed/embedding'][16:]) and np.any(got_four['params/new/kernel'])
  np.testing.assert_array_equal(got_four['params/layers/mlp/kernel'],
                                np.stack([x[f'params/layers_{i}/mlp/kernel'] for i in range(3)]))
  four_specs = checkpoints.saved_specs(four / '3' / 'default')
  assert four_specs['params/layers/mlp/kernel'] == P(None, 'data', 'model')


@pytest.mark.parametrize('fault', ['transform@1', 'write@0'])
def test_a_failing_process_stops_every_process(fault, two_process_checkpoint, tmp_path):
  in_path, _ = two_process_checkpoint
  start = time.monotonic()
  out, result = run_two_processes(tmp_path, in_path, {'transforms': RESHARD[:1]},
                                  env={'SURGERY_JOB_FAULT': fault, 'GRACE_SECONDS': '300'})
  elapsed = time.monotonic() - start
  assert result.returncode != 0
  for process in (0, 1):
    assert f'local.sh: process {process} failed with exit code' in result.stderr, result.stderr[-3000:]
  assert 'stopped after the grace period' not in result.stderr
  assert elapsed < 120
  failed = fault.split('@')[1]
  assert f'injected fault at {fault.split("@")[0]} on process {failed}' in (
      tmp_path / 'logs' / f'process_{failed}.log').read_text()
  assert checkpoints.visible_steps(out) == []
  assert_unlocked(out)
