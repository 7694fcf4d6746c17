"""Resuming a stopped run: only from the same input bytes, on the same topology, from intact records
and finished saves; stopped anywhere, the rerun finishes. A run that lost its lock writes nothing."""

import json
import re
import shutil
import signal
import time

import numpy as np
import psutil

import checkpoints
from jobs import assert_unlocked, ok, run_job, write_config
from test_safety import STREAMED, assert_same, paths, start_paused, values
from test_stops import job_processes, start_two, wait_for


def rerun(config, in_path, out, budget: str = STREAMED):
  """The streamed surgery run again: it must finish."""
  result = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', budget)
  ok(result)
  return result


def group_count(out) -> int:
  return len(json.loads((out / '3' / 'surgery_report.json').read_text())['groups'])


def stop_at(point: str, config, in_path, out, pause_file, stop=signal.SIGKILL) -> None:
  """Runs the streamed surgery until `point`, then stops it with `stop`."""
  process = start_paused(config, in_path, out, point, pause_file, STREAMED)
  process.send_signal(stop)
  process.wait(timeout=60)
  pause_file.unlink()


def test_an_input_rewritten_in_place_is_not_resumed(layered, baseline, tmp_path):
  config, _ = baseline
  in_path = tmp_path / 'in'
  shutil.copytree(layered[0], in_path)
  out, _, staging = paths(tmp_path)
  stop_at('group_written', config, in_path, out, tmp_path / 'paused', signal.SIGTERM)
  assert staging.exists()
  # The trainer writes step 3 again: the same shapes, other values.
  rewritten = tmp_path / 'rewritten'
  state = checkpoints.train_state(checkpoints.layered_params(seed=1))
  checkpoints.save_manager(rewritten, checkpoints.shard(state, checkpoints.mesh_2x4()), step=3)
  shutil.rmtree(in_path / '3')
  shutil.move(rewritten / '3', in_path / '3')
  result = rerun(config, in_path, out)
  assert 'Starting over: the input changed since the stopped run' in result.stderr
  assert 'Resuming' not in result.stderr
  solo = tmp_path / 'solo'
  ok(run_job(config, f'--config.input.path={in_path}', f'--config.output.path={solo}'))
  assert_same(values(out), values(solo))
  assert not staging.exists()


def test_stopped_after_the_last_group_before_finalize(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  stop_at('finalize', config, layered[0], out, tmp_path / 'paused')
  result = rerun(config, layered[0], out)
  groups = group_count(out)
  assert f'Resuming: {groups} of {groups} groups were written by an earlier run' in result.stderr
  assert_same(values(out), want)
  assert not staging.exists()
  assert_unlocked(out)


def test_a_finalize_cut_short_starts_the_groups_over(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  stop_at('finalize', config, layered[0], out, tmp_path / 'paused')
  # Killed in Orbax's merge: it had moved a file of a finished save into the merged checkpoint.
  folder = next(staging.glob('**/checkpoint.default.partial_save'))
  save = next(p for p in folder.iterdir() if '.pending_' in p.name)
  (save / '_CHECKPOINT_METADATA').rename(folder / '_CHECKPOINT_METADATA')
  result = rerun(config, layered[0], out)
  assert f'Resuming: 0 of {group_count(out)} groups' in result.stderr
  assert_same(values(out), want)
  assert not staging.exists()


def test_a_save_cut_short_keeps_the_groups_on_record(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  stop_at('group_written', config, layered[0], out, tmp_path / 'paused')
  # SIGKILL in the next group's save: Orbax's temporary folder, half written, beside the saves.
  folder = next(staging.glob('**/checkpoint.default.partial_save'))
  save = next(p for p in folder.iterdir() if '.pending_' in p.name)
  shutil.copytree(save, folder.with_name(folder.name + '.orbax-checkpoint-tmp'))
  result = rerun(config, layered[0], out)
  assert 'groups were written by an earlier run (groups 0)' in result.stderr
  assert_same(values(out), want)
  assert not staging.exists()


def test_sigkill_in_a_partial_save_keeps_the_groups_on_record(tmp_path):
  """Killed while Orbax writes a group's partial save, with its temporary folder in the staging
  folder (most of a long run's time): the groups on record are kept."""
  rng = np.random.default_rng(0)
  state = {'params': {f'w{i}': rng.normal(size=(1024, 2048)).astype(np.float32) for i in range(3)}}
  in_path, out, pause = tmp_path / 'in', tmp_path / 'out', tmp_path / 'paused'
  checkpoints.save_manager(in_path, state, step=3)
  config = write_config(tmp_path, {'transforms': []})
  one_leaf_a_group = '--config.memory.host_budget_gb=0.01'  # Each leaf is 8 MB.
  staging = out / '3.orbax-checkpoint-tmp-surgery'
  process = start_paused(config, in_path, out, 'group_written', pause, one_leaf_a_group)
  pause.unlink()  # Group 0 is on record; group 1 goes on.
  saving = '*/checkpoint.default.partial_save.orbax-checkpoint-tmp'
  while not list(staging.glob(saving)):
    assert process.poll() is None and not pause.exists(), 'group 1 was saved before it was seen'
    time.sleep(0.002)
  process.kill()
  process.wait(timeout=60)
  assert list(staging.glob(saving))
  result = rerun(config, in_path, out, one_leaf_a_group)
  assert 'Resuming: 1 of 3 groups were written by an earlier run (groups 0)' in result.stderr
  assert_same(checkpoints.flat_numpy(checkpoints.restore_plain(out / '3' / 'default')),
              checkpoints.flat_numpy(state))
  assert not staging.exists()


def test_a_damaged_record_keeps_the_intact_ones(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  stop_at('group_written', config, layered[0], out, tmp_path / 'paused')
  stop_at('group_written', config, layered[0], out, tmp_path / 'paused')  # Group 1 on record too.
  record = next(staging.glob('*/groups/1.json'))
  record.write_text(record.read_text()[:40])  # Cut short, as a full disk would.
  result = rerun(config, layered[0], out)
  assert 'groups were written by an earlier run (groups 0)' in result.stderr
  assert re.search(rf'Ignoring the damaged record {staging}/[0-9a-f]{{32}}/groups/1.json', result.stderr)
  assert_same(values(out), want)
  assert not staging.exists()


def test_a_resumed_group_damaged_on_disk_fails_once_then_starts_over(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  stop_at('group_written', config, layered[0], out, tmp_path / 'paused')
  for data in staging.glob('**/*.pending_*/state/ocdbt.process_0/d/*'):
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
  failed = run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={out}',
                   STREAMED)
  assert failed.returncode == 1 and 'finalize failed: ' in failed.stderr
  assert 'groups were written by an earlier run (groups 0)' in failed.stderr
  assert not staging.exists()
  result = rerun(config, layered[0], out)
  assert 'Resuming' not in result.stderr
  assert_same(values(out), want)


def test_another_number_of_processes_starts_over(two_process_checkpoint, baseline, tmp_path):
  config, want = baseline
  in_path, _ = two_process_checkpoint
  out, _, staging = paths(tmp_path)
  pause = tmp_path / 'paused'
  launcher = start_two(tmp_path, in_path, config, STREAMED,
                       env={'SURGERY_JOB_PAUSE': 'group_written@0', 'SURGERY_JOB_PAUSE_FILE': str(pause),
                            'GRACE_SECONDS': '300'})
  wait_for(pause, launcher)
  for process in job_processes(launcher).values():
    process.send_signal(signal.SIGTERM)
  launcher.wait(timeout=120)
  assert staging.exists()
  result = rerun(config, in_path, out)
  assert 'Starting over: the stopped run had 2 processes and 8 devices, this one 1 and 8' in result.stderr
  assert_same(values(out), want)
  assert not staging.exists()


def files_of(folder) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in folder.rglob('*') if p.is_file()}


def test_a_run_that_lost_its_lock_writes_nothing_more(layered, baseline, tmp_path):
  config, want = baseline
  out, _, staging = paths(tmp_path)
  short_lock = '--config.output.lock_timeout_seconds=2'
  stalled_pause, owner_pause = tmp_path / 'stalled', tmp_path / 'owner'
  stalled = start_paused(config, layered[0], out, 'group_written', stalled_pause, STREAMED, short_lock)
  psutil.Process(stalled.pid).suspend()  # SIGSTOP: a VM pause, silent past the lock's timeout.
  time.sleep(3)
  owner = start_paused(config, layered[0], out, 'group_written', owner_pause, STREAMED, short_lock)
  staged = files_of(staging)
  psutil.Process(stalled.pid).resume()
  stalled_pause.unlink()  # The stalled run goes on from where it stopped.
  stderr = stalled.communicate(timeout=120)[1]
  assert stalled.returncode == 1, stderr[-3000:]
  assert f'lost the lock of {out / "3"} to another run' in stderr
  assert files_of(staging) == staged
  deadline = time.monotonic() + 120
  while owner.poll() is None:  # It pauses after each group it writes: let it go on each time.
    assert time.monotonic() < deadline
    owner_pause.unlink(missing_ok=True)
    time.sleep(0.05)
  assert owner.returncode == 0, owner.stderr.read()[-3000:]
  assert_same(values(out), want)
  assert not staging.exists()
  assert_unlocked(out)
