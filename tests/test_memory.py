"""Streaming under `memory.host_budget_gb`: several groups, the same output as one group. Every op
streamed runs in this process (`jobs.outcome`; tests/test_ops.py runs each op as the command); the
other streamed runs here are the command."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from jobs import REPO, job_command, job_env, launch, ok, outcome, run_job, surgery, write_config
from test_bad_input import assert_bad_input
from test_ops import CASES, STACK, check_case

TINY_BUDGET = {'memory': {'host_budget_gb': 4e-6}}  # 4 KB of a 15 KB checkpoint.


def report_of(out, step: int) -> dict:
  return json.loads((out / str(step) / 'surgery_report.json').read_text())


def report(out) -> dict:
  return report_of(out, 3)


@pytest.mark.parametrize('name', list(CASES))
def test_every_op_streams_in_groups(name, layered, tmp_path):
  transforms, extra, _, _ = CASES[name]
  in_path, x = layered
  out = tmp_path / 'out'
  assert outcome({'transforms': transforms, **extra, **TINY_BUDGET, 'input': {'path': str(in_path)},
                  'output': {'path': str(out)}}) == 'ok'
  assert len(report(out)['groups']) > 1
  check_case(name, out / '3' / 'default', x)


def test_groups_give_the_same_bits_as_one_group(layered, tmp_path):
  in_path, _ = layered
  transforms = [STACK, dict(op='pad', pattern='embed/embedding', axis=0, size=20, init='mean'),
                dict(op='add', path='new/kernel', shape=[8, 16], init='normal'),
                dict(op='cast', pattern='head/kernel', dtype='bfloat16')]
  (tmp_path / 'one').mkdir()
  (tmp_path / 'many').mkdir()
  one, result = surgery(tmp_path / 'one', in_path, transforms)
  ok(result)
  many, result = surgery(tmp_path / 'many', in_path, transforms, **TINY_BUDGET)
  ok(result)
  assert len(report(one)['groups']) == 1 and len(report(many)['groups']) > 2
  assert report(many)['groups_read_ahead']  # Read while the group before was written.
  got_one = checkpoints.flat_numpy(checkpoints.restore_plain(one / '3' / 'default'))
  got_many = checkpoints.flat_numpy(checkpoints.restore_plain(many / '3' / 'default'))
  assert sorted(got_one) == sorted(got_many)
  for key in got_one:
    assert got_one[key].tobytes() == got_many[key].tobytes(), key


def test_leaves_read_together_share_a_group_and_oversize_groups_are_logged(layered, tmp_path):
  in_path, _ = layered
  out, result = surgery(tmp_path, in_path, [STACK], **TINY_BUDGET)
  ok(result)
  group = next(g for g in report(out)['groups'] if 'params/layers/mlp/kernel' in g['outputs'])
  assert set(group['inputs']) >= {f'params/layers_{i}/mlp/kernel' for i in range(3)}
  assert 'over the budget of 0.00 GB; handled alone' in result.stderr
  sources = [k for g in report(out)['groups'] for k in g['inputs']]
  assert len(sources) == len(set(sources))  # Every input is restored once.


def test_dry_run_shows_groups_and_predicted_peak(layered, tmp_path):
  in_path, _ = layered
  out, result = surgery(tmp_path, in_path, [STACK], dry_run=True, memory={'host_budget_gb': 1e-5})
  ok(result)
  assert 'predicted peak of arrays per host' in result.stdout
  groups = [line for line in result.stdout.splitlines() if line.strip().startswith('group ')]
  assert len(groups) > 1
  assert not out.exists()


def test_a_budget_must_be_positive(layered, tmp_path):
  in_path, _ = layered
  _, result = surgery(tmp_path, in_path, [], memory={'host_budget_gb': -1.0})
  assert result.returncode == 2
  assert 'memory.host_budget_gb must be positive, or 0 for none' in result.stderr.strip().splitlines()[-1]


def fake_cgroup(tmp_path, limit: int, used: int) -> dict:
  """The environment of a job whose cgroup (v2) allows `limit` bytes and uses `used`."""
  root = tmp_path / 'cgroup'
  root.mkdir()
  (root / 'memory.max').write_text(f'{limit}\n')
  (root / 'memory.current').write_text(f'{used}\n')
  return {'SURGERY_JOB_CGROUP_ROOT': str(root)}


def test_the_default_budget_comes_from_the_cgroup_limit(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'out'
  result = run_job(write_config(tmp_path, {'transforms': [STACK]}), f'--config.input.path={in_path}',
                   f'--config.output.path={out}', env=fake_cgroup(tmp_path, 31_000, 1_000))
  ok(result)
  # 40% of the 30,000 bytes the cgroup has left: 12 KB of arrays per group.
  assert ('Memory budget: 0.000 GB of arrays per group (40% of 0.00 GB available (cgroup v2 '
          'memory.max), shared by 1 process on this host)') in result.stderr
  groups = report(out)['groups']
  assert len(groups) > 1 and max(g['host_bytes'] for g in groups) <= 12_000
  check_case('stack', out / '3' / 'default', x)


def test_a_plan_that_cannot_fit_is_refused_before_reading(layered, tmp_path):
  in_path, _ = layered
  out = tmp_path / 'out'
  result = run_job(write_config(tmp_path, {'transforms': [STACK]}), f'--config.input.path={in_path}',
                   f'--config.output.path={out}', env=fake_cgroup(tmp_path, 5_000, 0))
  assert_bad_input(result, 'not enough memory: ')
  assert 'over the memory budget of 0.000 GB (40% of 0.00 GB available (cgroup v2 memory.max)' in result.stderr
  assert 'Progress counts' not in result.stderr and not out.exists()


# Runs a command and prints its exit code and its peak RSS in bytes (`getrusage` of the child).
_PEAK_RSS = ('import resource, subprocess, sys; '
             'rc = subprocess.run(sys.argv[1:], capture_output=True).returncode; '
             'print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)')


def peak_rss(config_file, *overrides: str) -> int:
  """The peak RSS of one job run, in a fresh process; the run must succeed."""
  result = subprocess.run([sys.executable, '-c', _PEAK_RSS, *job_command(config_file, *overrides)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, check=True)
  code, rss = result.stdout.split()
  assert code == '0', result.stdout
  return int(rss)


def float32_checkpoint(path, leaves: int, rows: int) -> None:
  """`leaves` float32 (rows, 1024) params sharded over the 2x4 mesh, and a step."""
  sharding = NamedSharding(checkpoints.mesh_2x4(), P('data', 'model'))
  rng = np.random.default_rng(0)
  params = {f'layer_{i}': {'w': jax.device_put(rng.standard_normal((rows, 1024), np.float32), sharding)}
            for i in range(leaves)}
  checkpoints.save_manager(path, {'params': params, 'step': np.asarray(1, np.int32)}, step=1)


def test_a_streamed_cast_peaks_within_the_budget_plus_the_runtime(tmp_path):
  # What each group's jitted transform holds beyond its arrays counts against the budget: the
  # statistics of a cast once made XLA keep wide copies and int64 masks of every cast leaf
  # (peak 2.30 GiB for a budget of 0.5 GB). The runtime's fixed cost is the same surgery of a tiny
  # checkpoint, one group.
  cast = write_config(tmp_path, {'transforms': [
      dict(op='cast', pattern=r'layer_[0-4]/w', dtype='bfloat16'),
      dict(op='rename', pattern=r'layer_(\d+)/w', replacement=r'layer_\1/kernel')]})
  float32_checkpoint(tmp_path / 'tiny', leaves=6, rows=8)
  float32_checkpoint(tmp_path / 'large', leaves=6, rows=8192)  # 6 leaves of 32 MiB.
  fixed = peak_rss(cast, f'--config.input.path={tmp_path / "tiny"}',
                   f'--config.output.path={tmp_path / "tiny_out"}')
  budget = 0.12e9
  peak = peak_rss(cast, f'--config.input.path={tmp_path / "large"}',
                  f'--config.output.path={tmp_path / "out"}', f'--config.memory.host_budget_gb={budget / 1e9}')
  streamed = report_of(tmp_path / 'out', 1)
  assert len(streamed['groups']) >= 3 and streamed['groups_read_ahead']
  assert peak - fixed <= 1.5 * budget, f'{(peak - fixed) / 1e6:.0f} MB over the runtime'


def logged_peaks(log_dir) -> list[float]:
  """Each process's peak RSS in GiB, as it logged it at the end of a run."""
  return [float(re.search(r'Process \d+: peak RSS ([\d.]+) GiB', (log_dir / f'process_{i}.log').read_text()).group(1))
          for i in range(2)]


def test_each_of_two_processes_exporting_safetensors_stays_within_its_budget(tmp_path):
  # The export is gather-free: every process writes the shards it holds at their offsets, so each
  # holds about its budget, never the model (192 MiB here, 0.05 GB per process). The runtime's
  # fixed cost is each process's peak exporting a tiny checkpoint.
  export = write_config(tmp_path, {'transforms': [{'op': 'drop_optimizer'}],
                                   'output': {'format': 'safetensors'}})
  float32_checkpoint(tmp_path / 'tiny', leaves=6, rows=8)
  float32_checkpoint(tmp_path / 'large', leaves=6, rows=8192)
  budget = 0.05e9
  peaks = {}
  for name in ('tiny', 'large'):
    ok(launch(2, f'--config={export}', f'--config.input.path={tmp_path / name}',
              f'--config.output.path={tmp_path / (name + "_hf")}',
              f'--config.memory.host_budget_gb={budget / 1e9}', log_dir=tmp_path / f'{name}_logs'))
    peaks[name] = logged_peaks(tmp_path / f'{name}_logs')
  assert len(json.loads((tmp_path / 'large_hf' / '1' / 'surgery_report.json').read_text())['groups']) >= 6
  for process, (fixed, peak) in enumerate(zip(peaks['tiny'], peaks['large'])):
    assert (peak - fixed) * 2**30 <= 1.5 * budget, (
        f'process {process}: {(peak - fixed) * 2**30 / 1e6:.0f} MB over the runtime')


def test_a_group_counts_what_its_transform_holds_besides_its_arrays(tmp_path):
  # XLA's program for `jnp.unwrap` holds about 9 times its leaf in temporaries, one block per CPU
  # device: counted by their arrays alone, 7 leaves of 2 MiB would share each group of a 0.03 GB
  # budget, and their temporaries together would hold 0.13 GB.
  unwrap = write_config(tmp_path, {'transforms': [
      dict(op='map', pattern=r'layer_\d+/w', fn='jax.numpy:unwrap')]})
  float32_checkpoint(tmp_path / 'tiny', leaves=8, rows=8)
  float32_checkpoint(tmp_path / 'large', leaves=8, rows=512)
  fixed = peak_rss(unwrap, f'--config.input.path={tmp_path / "tiny"}',
                   f'--config.output.path={tmp_path / "tiny_out"}')
  budget = 0.03e9
  peak = peak_rss(unwrap, f'--config.input.path={tmp_path / "large"}',
                  f'--config.output.path={tmp_path / "out"}', f'--config.memory.host_budget_gb={budget / 1e9}')
  # Before they were counted: 0.09 GB over the runtime.
  assert peak - fixed <= 1.5 * budget, f'{(peak - fixed) / 1e6:.0f} MB over the runtime'
  groups = report_of(tmp_path / 'out', 1)['groups']
  layers = [g for g in groups if any(k.startswith('params/layer_') for k in g['outputs'])]
  assert len(layers) == 8 and all(0 < g['temp_bytes'] <= budget - g['host_bytes'] for g in layers)
