"""Never lose or corrupt a checkpoint: kills at known moments, SIGTERM, idempotent reruns,
overwrite, damaged input and damaged output."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
from checkpoints import visible_steps
from jobs import REPO, assert_unlocked, job_command, job_env, launch, ok, run_job, write_config
from test_bad_input import assert_bad_input, digest

TRANSFORMS = [dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2'),
              dict(op='pad', pattern='embed/embedding', axis=0, size=24, init='normal')]
OTHER_TRANSFORMS = [dict(op='drop', pattern='head/.*')]
KILL_POINTS = ['read', 'plan', 'restore', 'transform', 'write', 'writing', 'validate', 'commit',
               'rename', 'renamed']


def paths(tmp_path):
  """The output path, its step 3 (what a run commits) and that step's staging folder."""
  out = tmp_path / 'out'
  return out, out / '3', out / '3.orbax-checkpoint-tmp-surgery'


def values(out) -> dict:
  return checkpoints.flat_numpy(checkpoints.restore_plain(out / '3' / 'default'))


def assert_same(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def start_paused(config, in_path, out, point: str, pause_file, *extra: str, env=None) -> subprocess.Popen:
  """Starts the job and returns once it waits at `point`."""
  process = subprocess.Popen(
      job_command(config, f'--config.input.path={in_path}', f'--config.output.path={out}', *extra),
      cwd=REPO, env=job_env(env={'SURGERY_JOB_PAUSE': point, 'SURGERY_JOB_PAUSE_FILE': str(pause_file),
                                 **(env or {})}),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not pause_file.exists():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline, f'never reached {point}'
    time.sleep(0.1)
  return process


@pytest.mark.parametrize('point', KILL_POINTS)
def test_sigkill_at_any_moment_loses_nothing(point, layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  before = digest(in_path)
  out, unit, staging = paths(tmp_path)
  process = start_paused(config, in_path, out, point, tmp_path / 'paused')
  process.kill()
  process.wait(timeout=60)
  assert digest(in_path) == before
  if unit.exists():  # Only once the rename happened: then it is complete and validated.
    assert point == 'renamed'
    assert_same(values(out), want)
  assert visible_steps(out) == ([3] if point == 'renamed' else [])
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}')
  ok(rerun)
  assert ('Already done' in rerun.stderr) == (point == 'renamed')
  assert_same(values(out), want)
  assert not staging.exists()
  assert_unlocked(out)
  assert digest(in_path) == before


@pytest.mark.parametrize('point', ['restore@1', 'writing@1', 'validate@0', 'rename@0'])
def test_sigkill_of_one_of_two_processes(point, layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  before = digest(in_path)
  out, _, staging = paths(tmp_path)
  pause_file = tmp_path / 'paused'
  args = (f'--config={config}', f'--config.input.path={in_path}', f'--config.output.path={out}',
          '--heartbeat_timeout_seconds=5')
  launcher = subprocess.Popen(
      ['bash', str(REPO / 'launch' / 'local.sh'), '2', '--', *args], cwd=REPO,
      env={**job_env(), 'SURGERY_JOB': f'{sys.executable} -m surgery_job',
           'LOG_DIR': str(tmp_path / 'logs'), 'GRACE_SECONDS': '300',
           'SURGERY_JOB_PAUSE': point, 'SURGERY_JOB_PAUSE_FILE': str(pause_file)},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not pause_file.exists():
    assert launcher.poll() is None and time.monotonic() < deadline
    time.sleep(0.1)
  subprocess.run(['kill', '-KILL', pause_file.read_text().split()[1]], check=True)
  start = time.monotonic()
  launcher.wait(timeout=180)
  assert launcher.returncode != 0
  assert time.monotonic() - start < 120
  assert visible_steps(out) == [] and digest(in_path) == before
  ok(launch(2, *args, log_dir=tmp_path / 'logs_rerun'))
  assert_same(values(out), want)
  assert not staging.exists()
  assert_unlocked(out)


def test_sigterm_stops_cleanly_with_its_own_exit_code(layered, baseline, tmp_path):
  config, _ = baseline
  out, unit, staging = paths(tmp_path)
  process = start_paused(config, layered[0], out, 'transform', tmp_path / 'paused')
  start = time.monotonic()
  process.send_signal(signal.SIGTERM)
  stderr = process.communicate(timeout=60)[1]
  assert process.returncode == 75
  assert time.monotonic() - start < 30
  assert 'SIGTERM received' in stderr and 'Stopped by SIGTERM' in stderr
  # The staging folder stays for the next run, hidden from readers; the lock is released.
  assert not unit.exists() and visible_steps(out) == [] and staging.exists()
  assert_unlocked(out)


def test_same_config_again_is_already_done(layered, baseline, tmp_path):
  config, _ = baseline
  out, unit, _ = paths(tmp_path)
  overrides = (f'--config.input.path={layered[0]}', f'--config.output.path={out}')
  ok(run_job(config, *overrides))
  report = (unit / 'surgery_report.json').read_text()
  again = run_job(config, *overrides, '--config.input.step=latest', '--config.memory.host_budget_gb=1.0')
  ok(again)
  assert 'Already done' in again.stderr
  assert (unit / 'surgery_report.json').read_text() == report
  assert json.loads(report)['fingerprint']


@pytest.fixture
def existing_output(layered, baseline, tmp_path):
  """An output made by the baseline config, the overrides that name it, and another config."""
  out, _, _ = paths(tmp_path)
  overrides = (f'--config.input.path={layered[0]}', f'--config.output.path={out}')
  ok(run_job(baseline[0], *overrides))
  return out, overrides, write_config(tmp_path, {'transforms': OTHER_TRANSFORMS}, name='other.py')


def test_another_config_without_overwrite_is_refused(baseline, existing_output):
  _, want = baseline
  out, overrides, other = existing_output
  result = run_job(other, *overrides)
  assert_bad_input(result, f'step 3 of output.path {out} exists and holds another surgery (fingerprint ')
  assert_same(values(out), want)
  refusal = result.stderr.strip().splitlines()[-1].removeprefix('surgery-job: error: ')
  planned = run_job(other, *overrides, '--config.dry_run=True')
  ok(planned)
  assert f'Dry run: the real run would be refused: {refusal}.' in planned.stderr


def test_overwrite_keeps_the_old_output_until_the_new_one_validates(layered, baseline, existing_output,
                                                                     tmp_path):
  _, want = baseline
  out, overrides, other = existing_output
  _, unit, staging = paths(tmp_path)
  failed = run_job(other, *overrides, '--config.output.overwrite=True',
                   env={'SURGERY_JOB_CORRUPT_OUTPUT': '1'})
  assert failed.returncode == 1 and 'validation failed' in failed.stderr
  assert_same(values(out), want)
  # Killed between moving the old output aside and renaming the new one in: the next run puts
  # the old one back before it starts, then replaces it.
  process = start_paused(other, layered[0], out, 'rename', tmp_path / 'paused',
                         '--config.output.overwrite=True')
  process.kill()
  process.wait(timeout=60)
  assert not unit.exists() and (staging / 'replaced').exists()
  # Without overwrite, the next run puts the old output back and then refuses to replace it.
  refused = run_job(other, *overrides)
  assert_bad_input(refused, f'step 3 of output.path {out} exists and holds another surgery')
  assert_same(values(out), want)
  ok(run_job(other, *overrides, '--config.output.overwrite=True'))
  assert not any(k.startswith('params/head/') for k in values(out))
  assert not staging.exists()
  assert_unlocked(out)


def test_validation_catches_a_flipped_byte(layered, baseline, tmp_path):
  config, _ = baseline
  out, unit, _ = paths(tmp_path)
  result = run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={out}',
                   env={'SURGERY_JOB_CORRUPT_OUTPUT': '1'})
  assert result.returncode == 1
  assert 'validation failed' in result.stderr
  assert not unit.exists() and visible_steps(out) == []
  assert_unlocked(out)


def test_a_missing_data_file_is_named(layered, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(layered[0], damaged)
  data_file = next((damaged / '3' / 'default' / 'd').iterdir())
  data_file.unlink()
  result = run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={damaged}',
                   f'--config.output.path={tmp_path / "out"}')
  assert_bad_input(result, f'checkpoint file {data_file} is missing')
  assert not (tmp_path / 'out').exists()


def test_a_damaged_metadata_file_is_named(layered, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(layered[0], damaged)
  (damaged / '3' / 'default' / '_METADATA').write_text('{"tree_metadata": ')
  result = run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={damaged}',
                   f'--config.output.path={tmp_path / "out"}')
  assert_bad_input(result, f'damaged checkpoint metadata file {damaged / "3" / "default" / "_METADATA"}')


def test_a_staging_folder_it_did_not_make_is_left_alone(layered, baseline, tmp_path):
  config, _ = baseline
  out, _, staging = paths(tmp_path)
  staging.mkdir(parents=True)
  (staging / 'mine.txt').write_text('not yours')
  result = run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={out}')
  assert_bad_input(result, f'{staging} exists but was not made by surgery_job')
  assert (staging / 'mine.txt').read_text() == 'not yours'


STREAMED = '--config.memory.host_budget_gb=4e-6'  # Many groups of the 15 KB checkpoint.


@pytest.mark.parametrize('stop', [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_run_resumes_from_the_groups_it_wrote(stop, layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, unit, staging = paths(tmp_path)
  process = start_paused(config, in_path, out, 'group_written', tmp_path / 'paused', STREAMED)
  process.send_signal(stop)
  process.wait(timeout=60)
  assert process.returncode == (-signal.SIGKILL if stop == signal.SIGKILL else 75)
  assert visible_steps(out) == [] and staging.exists()
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED)
  ok(rerun)
  assert 'groups were written by an earlier run (groups 0)' in rerun.stderr
  report = json.loads((unit / 'surgery_report.json').read_text())
  assert report['groups_reused'] == [0]
  assert 0 < report['bytes_read_this_run'] < report['bytes_read']
  assert_same(values(out), want)  # The same bits as the uninterrupted run's.
  assert not staging.exists()


def test_another_surgery_discards_the_groups_a_stopped_run_wrote(layered, tmp_path):
  in_path, _ = layered
  out, _, staging = paths(tmp_path)
  process = start_paused(write_config(tmp_path, {'transforms': TRANSFORMS}), in_path, out,
                         'group_written', tmp_path / 'paused', STREAMED)
  process.kill()
  process.wait(timeout=60)
  other = run_job(write_config(tmp_path, {'transforms': OTHER_TRANSFORMS}, name='other.py'),
                  f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED)
  ok(other)
  assert 'Resuming' not in other.stderr
  assert not any(k.startswith('params/head/') for k in values(out))
  assert not staging.exists()
