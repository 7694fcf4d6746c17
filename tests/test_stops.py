"""Stops at any moment end with the documented exit code and one line: SIGTERM (75, or 0 once the
output is committed) on one process or several, a peer that never starts, a peer that hangs."""

import signal
import subprocess
import time

import psutil
import pytest

from checkpoints import visible_steps
from jobs import JOB, REPO, assert_unlocked, job_command, job_env, ok, run_job, write_config
from test_safety import TRANSFORMS, assert_same, paths, start_paused, values

STREAMED = '--config.memory.host_budget_gb=4e-6'


@pytest.mark.parametrize('delay', [0.2, 1.5, 3.0, 4.5, 6.0, 8.0])
def test_sigterm_at_any_moment(delay, layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, _, _ = paths(tmp_path)
  process = subprocess.Popen(
      job_command(config, f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED),
      cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  process.send_signal(signal.SIGTERM)
  stderr = process.communicate(timeout=60)[1]
  assert process.returncode in (0, 75), stderr[-3000:]
  assert 'Traceback' not in stderr and 'Check failure' not in stderr
  if process.returncode == 75:  # Nothing committed, nothing locked.
    assert visible_steps(out) == []
  else:  # It had committed before the stop: the output is the whole, validated one.
    assert visible_steps(out) == [3]
    assert_same(values(out), want)
  if out.exists():
    assert_unlocked(out)


def job_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
  """{process id: the OS process} of the job processes local.sh started."""
  found = {}
  for child in psutil.Process(launcher.pid).children(recursive=True):
    words = child.cmdline()
    if 'surgery_job' in words:
      found[int(next(w for w in words if w.startswith('--process_id=')).split('=')[1])] = child
  return found


def start_two(tmp_path, in_path, config_file, *extra: str, env=None) -> subprocess.Popen:
  out = tmp_path / 'out'
  return subprocess.Popen(
      ['bash', str(REPO / 'launch' / 'local.sh'), '2', '--', f'--config={config_file}',
       f'--config.input.path={in_path}', f'--config.output.path={out}', *extra],
      cwd=REPO, env={**job_env(), 'SURGERY_JOB': JOB, 'LOG_DIR': str(tmp_path / 'logs'),
                     'DEVICES_PER_PROCESS': '4', **(env or {})},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path, launcher, seconds=120) -> None:
  deadline = time.monotonic() + seconds
  while not path.exists():
    assert launcher.poll() is None, launcher.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.1)


def test_sigterm_to_every_process(two_process_checkpoint, tmp_path):
  in_path, _ = two_process_checkpoint
  pause = tmp_path / 'paused'
  # Process 1 waits before its transform; process 0 goes on into the collective and blocks there.
  launcher = start_two(tmp_path, in_path, write_config(tmp_path, {'transforms': TRANSFORMS}),
                       env={'SURGERY_JOB_PAUSE': 'transform@1', 'SURGERY_JOB_PAUSE_FILE': str(pause),
                            'GRACE_SECONDS': '300'})
  wait_for(pause, launcher)
  time.sleep(2)
  start = time.monotonic()
  for process in job_processes(launcher).values():
    process.send_signal(signal.SIGTERM)
  stderr = launcher.communicate(timeout=120)[1]
  assert time.monotonic() - start < 60
  for index in (0, 1):
    assert f'local.sh: process {index} failed with exit code 75' in stderr, stderr[-3000:]
  assert visible_steps(tmp_path / 'out') == []
  assert_unlocked(tmp_path / 'out')


def test_a_peer_that_never_starts(tmp_path):
  config = write_config(tmp_path, {'transforms': []})
  start = time.monotonic()
  result = subprocess.run(
      job_command(config, f'--config.input.path={tmp_path}', f'--config.output.path={tmp_path / "out"}',
                  '--coordinator_address=127.0.0.1:' + str(free_port()), '--num_processes=2',
                  '--process_id=0', '--init_timeout_seconds=5'),
      cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert time.monotonic() - start < 60
  assert 'Could not join the cluster in 5 s' in result.stderr
  assert 'Check failure' not in result.stderr and 'Traceback' not in result.stderr


def test_a_peer_that_hangs(two_process_checkpoint, tmp_path):
  in_path, _ = two_process_checkpoint
  pause = tmp_path / 'paused'
  launcher = start_two(tmp_path, in_path, write_config(tmp_path, {'transforms': TRANSFORMS}),
                       '--heartbeat_timeout_seconds=5',
                       env={'SURGERY_JOB_PAUSE': 'transform@1', 'SURGERY_JOB_PAUSE_FILE': str(pause),
                            'GRACE_SECONDS': '3'})
  wait_for(pause, launcher)
  hung = job_processes(launcher)[1]
  hung.suspend()  # SIGSTOP: alive, silent.
  start = time.monotonic()
  try:
    stderr = launcher.communicate(timeout=120)[1]
  finally:
    if hung.is_running():
      hung.kill()
  assert time.monotonic() - start < 60
  assert 'local.sh: process 0 failed with exit code 1' in stderr, stderr[-3000:]
  log = (tmp_path / 'logs' / 'process_0.log').read_text()
  assert 'process 1 stopped responding (no heartbeat for 5 s)' in log
  assert 'Check failure' not in log
  assert visible_steps(tmp_path / 'out') == []


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Ctrl-C: SIGINT ends a run as SIGTERM does, with the shell's 130, its staging kept for the rerun.

def test_ctrl_c_stops_in_one_line_and_the_rerun_resumes(layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, _, staging = paths(tmp_path)
  process = start_paused(config, in_path, out, 'group_written', tmp_path / 'paused', STREAMED)
  process.send_signal(signal.SIGINT)
  stderr = process.communicate(timeout=60)[1]
  assert process.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr, stderr[-3000:]
  assert ('Stopped by SIGINT on process 0; no output was left half-committed; run it again to '
          'finish.') in stderr
  assert staging.is_dir() and visible_steps(out) == []
  assert_unlocked(out)
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED)
  ok(rerun)
  assert 'Resuming: 1 of ' in rerun.stderr
  assert_same(values(out), want)


def test_ctrl_c_ends_a_watch_in_one_line(tmp_path):
  process = subprocess.Popen(
      job_command(write_config(tmp_path, {'transforms': [], 'watch': {'enabled': True}}),
                  f'--config.input.path={tmp_path / "trainer"}', f'--config.output.path={tmp_path / "out"}'),
      cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  while not any('for new committed steps' in line for line in lines):
    lines.append(process.stderr.readline())
    assert lines[-1], ''.join(lines)[-3000:]
  process.send_signal(signal.SIGINT)
  stderr = ''.join(lines) + process.communicate(timeout=60)[1]
  assert process.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr, stderr[-3000:]
  assert 'Stopped by SIGINT on process 0' in stderr
