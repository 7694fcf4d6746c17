"""The output lock on its own: one owner, owners named, gone owners taken over, nothing stolen."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from surgery_job import lock as lock_lib, paths
from surgery_job.errors import SurgeryError


def write_lock(unit, **record):
  """Puts down another run's lock, as a new file (as that run's write would be)."""
  path = unit.with_name(unit.name + lock_lib.SUFFIX)
  path.parent.mkdir(parents=True, exist_ok=True)
  aside = path.with_name(path.name + '.new')
  aside.write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                               'heartbeat': time.time(), 'token': 'theirs', **record}))
  os.replace(aside, path)
  return path


def assert_taken_over(unit, timeout_seconds: float) -> None:
  """A new run takes the lock on `unit` at once, and gives it up."""
  lock = lock_lib.Lock(unit, timeout_seconds)
  lock.acquire(wait_seconds=0)
  assert lock.held() and lock.owner()['pid'] == os.getpid()
  lock.release()
  assert lock.owner() is None


def test_one_owner_at_a_time_and_release(tmp_path):
  unit = tmp_path / 'out' / '3'
  first = lock_lib.Lock(unit, timeout_seconds=60)
  first.acquire(wait_seconds=0)
  assert first.held() and first.owner()['pid'] == os.getpid()
  second = lock_lib.Lock(unit, timeout_seconds=60)
  with pytest.raises(SurgeryError, match=rf'{unit} is being written by another run \(host '
                     rf'{socket.gethostname()} pid {os.getpid()}, started .* UTC, last heartbeat \d+ s ago\)'):
    second.acquire(wait_seconds=0)
  first.release()
  assert not list(unit.parent.iterdir())
  second.acquire(wait_seconds=0)
  assert second.held()
  second.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
  unit = tmp_path / '3'
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                        text=True, check=True)
  write_lock(unit, pid=int(dead.stdout))
  assert_taken_over(unit, timeout_seconds=3600)


def test_another_host_is_taken_over_only_after_the_timeout(tmp_path):
  unit = tmp_path / '3'
  write_lock(unit, host='elsewhere', pid=1, heartbeat=time.time() - 30)
  with pytest.raises(SurgeryError, match='host elsewhere pid 1'):
    lock_lib.Lock(unit, timeout_seconds=60).acquire(wait_seconds=0)
  write_lock(unit, host='elsewhere', pid=1, heartbeat=time.time() - 90)
  assert_taken_over(unit, timeout_seconds=60)


def test_waits_for_the_owner(tmp_path):
  unit = tmp_path / '3'
  owner = lock_lib.Lock(unit, timeout_seconds=60)
  owner.acquire(wait_seconds=0)
  waiter = lock_lib.Lock(unit, timeout_seconds=60)
  threading.Timer(1.5, owner.release).start()
  start = time.monotonic()
  waiter.acquire(wait_seconds=30)
  assert waiter.held() and 1.0 < time.monotonic() - start < 30
  waiter.release()


def test_a_fresh_lock_put_down_during_a_take_over_is_not_stolen(tmp_path):
  unit = tmp_path / '3'
  path = write_lock(unit, host='elsewhere', token='stale', heartbeat=time.time() - 90)
  taker = paths.Lease(paths.of(path))
  assert json.loads(taker.read())['token'] == 'stale'
  write_lock(unit, host='elsewhere', token='fresh')  # A third run took the stale lock over first.
  assert not taker.write_if_unchanged(b'{"token": "mine"}')
  assert lock_lib.Lock(unit, timeout_seconds=60).owner()['token'] == 'fresh'
  assert [p.name for p in tmp_path.iterdir()] == ['3' + lock_lib.SUFFIX]


def test_the_heartbeat_refreshes_the_lock(tmp_path):
  unit = tmp_path / '3'
  lock = lock_lib.Lock(unit, timeout_seconds=6)  # Beats every second.
  lock.acquire(wait_seconds=0)
  first = lock.owner()['heartbeat']
  time.sleep(2.5)
  assert lock.owner()['heartbeat'] > first and lock.held()
  lock.release()


def test_unwritable_place_is_a_clear_error(tmp_path):
  with pytest.raises(SurgeryError, match='cannot write beside /sys/surgery_job/3: Operation not permitted'):
    lock_lib.Lock('/sys/surgery_job/3', timeout_seconds=60).acquire(wait_seconds=0)
