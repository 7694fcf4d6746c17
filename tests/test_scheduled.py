"""Scheduled conversions beside a live training run: an output directory that grows step by
step, 'all', 'new' and lists of steps, max_to_keep, and watch mode, with a writer adding steps."""

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoints
from jobs import REPO, assert_unlocked, job_command, job_env, launch, ok, run_job, write_config
from surgery_job.output import RECORD
from test_bad_input import assert_bad_input
from test_configs import wrote_line
from test_safety import assert_same, start_paused
from write_steps import state_at

SERVING = {'transforms': [dict(op='drop_optimizer')]}
WRITER = [sys.executable, str(REPO / 'tests' / 'write_steps.py')]


def expected(step: int) -> dict:
  return {k: v for k, v in checkpoints.flat_numpy(state_at(step)).items()
          if not k.startswith('opt_state/')}


def assert_exported(out, steps, read_on_these_devices: bool = True) -> None:
  """The output lists exactly `steps` to a plain CheckpointManager, each the serving export, read
  by that manager (or, for an output written on other device ids, with explicit shardings)."""
  assert checkpoints.visible_steps(out) == sorted(steps)
  with ocp.CheckpointManager(out) as manager:
    for step in steps:
      got = checkpoints.flat_numpy(manager.restore(step) if read_on_these_devices
                                   else checkpoints.restore_plain(out / str(step) / 'default'))
      want = expected(step)
      assert sorted(got) == sorted(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'step {step} {key}')
  assert_unlocked(out)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A CheckpointManager directory with committed steps 1, 2, 4 and step 6 in progress."""
  path = tmp_path_factory.mktemp('trained') / 'ckpt'
  subprocess.run([*WRITER, str(path), '0', '1', '2', '4', '6'], cwd=REPO, env=job_env(), check=True)
  return path


def run(tmp_path, in_path, out, *overrides, config=SERVING):
  return run_job(write_config(tmp_path, config), f'--config.input.path={in_path}',
                 f'--config.output.path={out}', *overrides)


def test_all_then_new_adds_steps_and_skips_what_is_done(trained, tmp_path):
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=[2]'))
  assert_exported(out, [2])
  result = run(tmp_path, trained, out, '--config.input.step=all')
  ok(result)
  assert 'Already done: step 2' in result.stderr
  assert result.stdout.splitlines() == [wrote_line(out / '1'), wrote_line(out / '2', 'Already done:'),
                                        wrote_line(out / '4')]
  assert_exported(out, [1, 2, 4])
  again = run(tmp_path, trained, out, '--config.input.step=new')
  ok(again)
  assert 'Nothing to convert' in again.stderr
  assert_exported(out, [1, 2, 4])


def test_latest_is_the_latest_committed_step(trained, tmp_path):
  out = tmp_path / 'out'
  result = run(tmp_path, trained, out, '--verbosity=-1')
  ok(result)
  assert_exported(out, [4])
  assert result.stdout.splitlines() == [wrote_line(out / '4')]  # The step 'latest' chose.
  assert not [line for line in result.stderr.splitlines() if line.startswith('I')], result.stderr


def test_max_to_keep_keeps_the_newest(trained, tmp_path):
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=all', '--config.output.max_to_keep=2'))
  assert_exported(out, [2, 4])
  again = run(tmp_path, trained, out, '--config.input.step=new', '--config.output.max_to_keep=2')
  ok(again)
  assert 'Nothing to convert' in again.stderr  # Step 1 went; it is not new.


def test_a_failing_step_in_a_list_is_named_and_the_others_stand(trained, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(trained, damaged)
  data_file = next((damaged / '2' / 'default' / 'd').iterdir())
  data_file.unlink()
  out = tmp_path / 'out'
  result = run(tmp_path, damaged, out, '--config.input.step=[1,2,4]')
  assert_bad_input(result, f'input step 2: checkpoint file {data_file} is missing')
  assert_exported(out, [1])  # Committed before the failure; step 4 never started.


def test_unknown_steps_and_output_step_with_several_steps(trained, tmp_path):
  out = tmp_path / 'out'
  assert_bad_input(run(tmp_path, trained, out, '--config.input.step=[1,6]'),
                   'input.step 6 not found in')
  assert_bad_input(run(tmp_path, trained, out, '--config.input.step=all', '--config.output.step=9'),
                   'output.step is set but input.step names 3 steps')
  assert not out.exists()


def test_new_steps_while_a_writer_adds_them(tmp_path):
  in_path, out = tmp_path / 'in', tmp_path / 'out'
  writer = subprocess.Popen([*WRITER, str(in_path), '2', '1', '2', '3', '4'], cwd=REPO, env=job_env())
  while writer.poll() is None:
    if in_path.exists():
      ok(run(tmp_path, in_path, out, '--config.input.step=new'))
    time.sleep(0.5)
  assert writer.returncode == 0
  ok(run(tmp_path, in_path, out, '--config.input.step=new'))
  assert_exported(out, [1, 2, 3])  # Step 4 was left in progress: never read.


def test_watch_converts_each_step_as_it_appears(tmp_path):
  in_path, out = tmp_path / 'in', tmp_path / 'out'
  watcher = subprocess.Popen(
      job_command(write_config(tmp_path, {**SERVING, 'watch': {
          'enabled': True, 'poll_seconds': 0.5, 'idle_timeout_seconds': 8.0}}),
                  f'--config.input.path={in_path}', f'--config.output.path={out}'),
      cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Steps 1 s apart, well within the idle timeout; the watch then ends 8 s after the last one.
  writer = subprocess.run([*WRITER, str(in_path), '1', '10', '20', '30', '40'], cwd=REPO,
                          env=job_env(), check=True)
  stdout, stderr = watcher.communicate(timeout=300)
  assert watcher.returncode == 0, stderr[-3000:]
  assert writer.returncode == 0
  for step in (10, 20, 30):
    assert f'Converting input step {step}.' in stderr
  assert 'input step 40' not in stderr and 'No new step for 8 s' in stderr
  assert_exported(out, [10, 20, 30])
  assert stdout.splitlines() == [wrote_line(out / str(step)) for step in (10, 20, 30)]


def test_watch_stops_on_sigterm(tmp_path):
  """Between polls too: a clean stop (its log line), not the forced one 30 s later."""
  watcher = subprocess.Popen(
      job_command(write_config(tmp_path, {**SERVING, 'watch': {'enabled': True, 'poll_seconds': 300.0}}),
                  f'--config.input.path={tmp_path / "in"}', f'--config.output.path={tmp_path / "out"}'),
      cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines, watching = [], threading.Event()

  def read_stderr():
    for line in watcher.stderr:
      lines.append(line)
      if 'Watching' in line:
        watching.set()
  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  watching.wait(timeout=120)
  time.sleep(1)  # Past the first poll, into the 300 s sleep.
  watcher.terminate()
  watcher.wait(timeout=60)
  reader.join(timeout=60)
  stderr = ''.join(lines)
  assert watcher.returncode == 75, stderr[-3000:]
  assert 'Watching' in stderr and 'Stopped by SIGTERM' in stderr


def test_two_processes_agree_on_the_steps(trained, tmp_path):
  out = tmp_path / 'out'
  ok(launch(2, f'--config={write_config(tmp_path, SERVING)}', f'--config.input.path={trained}',
            f'--config.output.path={out}', '--config.input.step=all', log_dir=tmp_path / 'logs'))
  assert_exported(out, [1, 2, 4], read_on_these_devices=False)


@pytest.mark.parametrize('run', [
    {'watch': {'enabled': True, 'poll_seconds': 0.5, 'idle_timeout_seconds': 2.0}},
    {'input': {'step': 'new'}},  # A scheduled export of what is new: the steps are the job's choice.
    {'input': {'step': 'all'}},
], ids=['watch', 'new', 'all'])
def test_a_step_the_trainer_deletes_while_it_is_read_is_skipped(run, layered, tmp_path):
  in_path, out, pause = tmp_path / 'in', tmp_path / 'out', tmp_path / 'paused'
  for step in (1, 2):
    shutil.copytree(layered[0] / '3', in_path / str(step))
  watcher = subprocess.Popen(
      job_command(write_config(tmp_path, {'transforms': [], **run}),
                  f'--config.input.path={in_path}', f'--config.output.path={out}'),
      cwd=REPO, env=job_env(env={'SURGERY_JOB_PAUSE': 'restore', 'SURGERY_JOB_PAUSE_FILE': str(pause)}),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for deleted in (True, False):  # Step 1 is deleted once its metadata is read; step 2 is not.
    deadline = time.monotonic() + 120
    while not pause.exists():
      assert watcher.poll() is None and time.monotonic() < deadline, watcher.stderr.read()[-3000:]
      time.sleep(0.1)
    if deleted:
      shutil.rmtree(in_path / '1')  # As the trainer's max_to_keep does.
    pause.unlink()  # The job goes on.
  stderr = watcher.communicate(timeout=300)[1]
  assert watcher.returncode == 0, stderr[-3000:]
  assert ('Skipping input step 1: it is no longer a committed step of the input (deleted while it '
          'was read, as by the trainer keeping its newest steps)') in stderr
  assert checkpoints.visible_steps(out) == [2]
  assert sorted(p.name for p in out.iterdir()) == ['2', RECORD]
  assert_same(checkpoints.flat_numpy(checkpoints.restore_plain(out / '2' / 'default')), layered[1])


def test_a_step_named_by_the_user_and_deleted_while_it_is_read_is_one_line(layered, tmp_path):
  in_path, out, pause = tmp_path / 'in', tmp_path / 'out', tmp_path / 'paused'
  shutil.copytree(layered[0] / '3', in_path / '1')
  run = subprocess.Popen(
      job_command(write_config(tmp_path, {'transforms': [], 'input': {'step': 1}}),
                  f'--config.input.path={in_path}', f'--config.output.path={out}'),
      cwd=REPO, env=job_env(env={'SURGERY_JOB_PAUSE': 'restore', 'SURGERY_JOB_PAUSE_FILE': str(pause)}),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not pause.exists():
    assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-3000:]
    time.sleep(0.1)
  shutil.rmtree(in_path / '1')
  pause.unlink()
  stderr = run.communicate(timeout=300)[1]
  assert run.returncode == 2, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      f'surgery-job: error: input.step 1 not found in {in_path}: deleted while it was read')
  assert checkpoints.visible_steps(out) == []


def test_what_stopped_runs_left_for_deleted_input_steps_is_swept(layered, tmp_path):
  # A run killed mid-write leaves its staging folder and lock for a resume; one killed just after
  # its commit leaves its lock. Once the trainer has deleted those input steps, no run comes back
  # for them: the next run of 'all' or 'new' removes them, and keeps the committed step.
  in_path, out = tmp_path / 'in', tmp_path / 'out'
  for step in (1, 2, 3):
    shutil.copytree(layered[0] / '3', in_path / str(step))
  config = write_config(tmp_path, {'transforms': []})
  for step, point in ((1, 'restore'), (2, 'renamed')):
    pause = tmp_path / f'paused_{step}'
    process = start_paused(config, in_path, out, point, pause, f'--config.input.step={step}')
    process.kill()
    process.wait(timeout=60)
  assert {'1.orbax-checkpoint-tmp-surgery', '1.surgery-lock', '2.surgery-lock'} <= {
      p.name for p in out.iterdir()}
  for step in (1, 2):
    shutil.rmtree(in_path / str(step))  # As the trainer's max_to_keep does.
  result = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
                   '--config.input.step=all')
  ok(result)
  assert 'Removed what a stopped run left for output step 1, whose input step is gone.' in result.stderr
  assert not [p.name for p in out.iterdir() if '.surgery-lock' in p.name or '.orbax-checkpoint-tmp' in p.name]
  assert checkpoints.visible_steps(out) == [2, 3]
  assert_same(checkpoints.flat_numpy(checkpoints.restore_plain(out / '2' / 'default')), layered[1])
