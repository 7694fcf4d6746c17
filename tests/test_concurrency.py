"""Two runs on one output: one writes, the other waits or is refused naming the owner, and a third
run afterwards finds exactly the solo run's output."""

import socket
import subprocess
import time

import pytest

from checkpoints import visible_steps
from jobs import REPO, assert_unlocked, job_command, job_env, ok, run_job
from test_bad_input import assert_bad_input
from test_safety import assert_same, paths, start_paused, values

LOCKED = 'is being written by another run (host'


def start(config, in_path, out, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(
      job_command(config, f'--config.input.path={in_path}', f'--config.output.path={out}', *extra),
      cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_third_run_finds_the_solo_output(config, in_path, out, staging, want) -> None:
  third = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}')
  ok(third)
  assert_same(values(out), want)
  assert visible_steps(out) == [3] and not staging.exists()
  assert_unlocked(out)


@pytest.mark.parametrize('delay', [0.0, 2.0, 5.0])
def test_two_runs_started_together(delay, layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, _, staging = paths(tmp_path)
  first = start(config, in_path, out)
  time.sleep(delay)
  second = start(config, in_path, out)
  stderr = [p.communicate(timeout=300)[1] for p in (first, second)]
  codes = [first.returncode, second.returncode]
  assert 0 in codes, stderr
  for code, err in zip(codes, stderr):
    assert code in (0, 2), err[-3000:]
    if code == 2:  # Refused while the other one held the lock: one line naming the owner.
      assert 'Traceback' not in err
      assert err.strip().splitlines()[-1].startswith(f'surgery-job: error: {out / "3"} {LOCKED}')
  assert_third_run_finds_the_solo_output(config, in_path, out, staging, want)


def test_a_second_run_waits_for_the_first(layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, _, staging = paths(tmp_path)
  first = start(config, in_path, out)
  time.sleep(1.0)
  second = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
                   '--config.output.wait_seconds=240')
  assert first.wait(timeout=300) == 0
  ok(second)
  assert 'Already done' in second.stderr or 'Already done' in first.stderr.read()
  assert_third_run_finds_the_solo_output(config, in_path, out, staging, want)


def test_a_run_killed_midway_is_taken_over(layered, baseline, tmp_path):
  config, want = baseline
  in_path, _ = layered
  out, unit, staging = paths(tmp_path)
  first = start_paused(config, in_path, out, 'writing', tmp_path / 'paused')
  second = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}')
  assert_bad_input(second, f'{unit} {LOCKED} {socket.gethostname()} pid {first.pid}, started ')
  assert staging.exists()  # The second run left the first one's work alone.
  first.kill()
  first.wait(timeout=60)
  assert_third_run_finds_the_solo_output(config, in_path, out, staging, want)
