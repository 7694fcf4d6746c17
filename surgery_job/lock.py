"""One live run per output unit: a lease object beside the unit, kept fresh by a heartbeat.

The lock holds its owner (host, pid, start time, last heartbeat, a random token). It is created
only where there is none, and rewritten (heartbeat, take-over, release) only while it is still the
version its writer last saw (`paths.Lease`: a generation condition, on a local disk as on gs://).
Another run finds the owner alive, and exits naming it or waits; or gone (the same host and a pid
that no longer runs, or a heartbeat older than the timeout), and takes the lock over by replacing
the stale version it read: if a third run got there first, the replace fails and nothing is stolen.
"""

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from surgery_job import paths, stopping
from surgery_job.errors import SurgeryError

SUFFIX = '.surgery-lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _parse(data: bytes | None) -> dict | None:
  if data is None:
    return None
  try:
    record = json.loads(data)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(owner: dict) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(owner.get('started', 0)))
  return (f"host {owner.get('host')} pid {owner.get('pid')}, started {started}, "
          f"last heartbeat {time.time() - owner.get('heartbeat', 0):.0f} s ago")


class Lock:
  """The lease on `unit`: `unit` + SUFFIX, beside it."""

  def __init__(self, unit: paths.PathLike, timeout_seconds: float):
    self.unit = paths.of(unit)
    self.path = self.unit.with_name(self.unit.name + SUFFIX)
    self.timeout_seconds = timeout_seconds
    self.token = uuid.uuid4().hex
    self.started = time.time()
    self._lease: paths.Lease | None = None  # This run's view of the lock object.
    self._first_seen: dict[bytes, float] = {}  # Unreadable locks: when each version was first seen.
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _record(self) -> bytes:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': self.started,
                       'heartbeat': time.time(), 'token': self.token}).encode()

  def owner(self) -> dict | None:
    """The current owner's record; {} for a lock that cannot be read; None when there is none."""
    return _parse(paths.Lease(self.path).read())

  def held(self) -> bool:
    """Whether the lock in place is still this run's (checked before committing)."""
    owner = self.owner()
    return owner is not None and owner.get('token') == self.token

  def _gone(self, owner: dict, generation: bytes) -> bool:
    if owner.get('host') == socket.gethostname() and isinstance(owner.get('pid'), int):
      if not _alive(owner['pid']):
        return True
    heartbeat = owner.get('heartbeat')
    if not isinstance(heartbeat, (int, float)):  # Unreadable: silent since this run first saw it.
      heartbeat = self._first_seen.setdefault(generation, time.time())
    return time.time() - heartbeat > self.timeout_seconds

  def acquire(self, wait_seconds: float) -> None:
    """Takes the lock, waiting up to `wait_seconds` for a live owner; SurgeryError if it stays."""
    deadline = time.monotonic() + wait_seconds
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      lease = paths.Lease(self.path)
      while True:
        owner = _parse(lease.read())
        if owner is None or self._gone(owner, lease.generation):
          if lease.write_if_unchanged(self._record()):  # Created, or taken over from the dead.
            if owner is not None:
              logging.warning('Taking over the lock of %s from a run that is gone (%s).', self.unit,
                              describe(owner))
            break
          continue
        if time.monotonic() >= deadline:
          raise SurgeryError(
              f'{self.unit} is being written by another run ({describe(owner)}); it stays locked '
              f'until that run ends or is silent for {self.timeout_seconds:.0f} s '
              f'(set output.wait_seconds to wait for it)')
        stopping.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
      raise SurgeryError(f'cannot write beside {self.unit}: {e.strerror}') from None
    except ValueError as e:  # tensorstore's errors: one line, without its spec.
      raise SurgeryError(f'cannot write beside {self.unit}: {str(e).splitlines()[0]}') from None
    self._lease = lease
    self._heartbeat = threading.Thread(target=self._beat, name='surgery_job_lock', daemon=True)
    self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(max(1.0, self.timeout_seconds / 6)):
      try:
        if self._lease.write_if_unchanged(self._record()):
          continue
        owner = self.owner()
        logging.error('Lost the lock of %s to %s.', self.unit, describe(owner) if owner else 'nobody')
        return
      except (OSError, ValueError) as e:
        logging.warning('Could not refresh the lock of %s: %s', self.unit, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if self._heartbeat is None:
      return
    self._stop.set()
    self._heartbeat.join(timeout=5)
    self._lease.write_if_unchanged(None)
