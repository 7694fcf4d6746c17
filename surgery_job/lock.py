"""One live run per output unit: a lease file beside the unit, kept fresh by a heartbeat.

The lock holds its owner (host, pid, start time, last heartbeat, a random token) and appears in
one step, complete (written aside, then hard-linked into place, which fails if a lock is there).
The owner rewrites its heartbeat every few seconds. Another run finds the owner alive, and exits
naming it or waits; or gone (the same host and a pid that no longer runs, or a heartbeat older
than the timeout), and takes the lock over: it renames the lock aside, and keeps it broken only if
what it renamed is the stale lock it read, not one that a third run had just put down.
"""

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from absl import logging

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


def _read(path: Path) -> dict | None:
  try:
    text = path.read_text()
  except (FileNotFoundError, NotADirectoryError):
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(owner: dict) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(owner.get('started', 0)))
  return (f"host {owner.get('host')} pid {owner.get('pid')}, started {started}, "
          f"last heartbeat {time.time() - owner.get('heartbeat', 0):.0f} s ago")


class Lock:
  """The lease on `unit`: `unit` + SUFFIX, beside it."""

  def __init__(self, unit: Path, timeout_seconds: float):
    self.unit = unit
    self.path = unit.with_name(unit.name + SUFFIX)
    self.timeout_seconds = timeout_seconds
    self.token = uuid.uuid4().hex
    self.started = time.time()
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _record(self) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': self.started,
                       'heartbeat': time.time(), 'token': self.token})

  def _write_aside(self) -> Path:
    aside = self.path.with_name(f'{self.path.name}.{self.token}')
    aside.write_text(self._record())
    return aside

  def _try_create(self) -> bool:
    aside = self._write_aside()
    try:
      os.link(aside, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      aside.unlink()

  def owner(self) -> dict | None:
    """The current owner's record; {} for a lock that cannot be read; None when there is none."""
    return _read(self.path)

  def held(self) -> bool:
    """Whether the lock on disk is still this run's (checked before committing)."""
    owner = self.owner()
    return owner is not None and owner.get('token') == self.token

  def _gone(self, owner: dict) -> bool:
    if owner.get('host') == socket.gethostname() and isinstance(owner.get('pid'), int):
      if not _alive(owner['pid']):
        return True
    heartbeat = owner.get('heartbeat')
    if not isinstance(heartbeat, (int, float)):
      try:
        heartbeat = self.path.stat().st_mtime
      except FileNotFoundError:
        return False
    return time.time() - heartbeat > self.timeout_seconds

  def _take_over(self, owner: dict) -> None:
    broken = self.path.with_name(f'{self.path.name}.broken.{self.token}')
    try:
      os.rename(self.path, broken)
    except FileNotFoundError:
      return
    if (_read(broken) or {}).get('token') != owner.get('token'):
      # A third run's fresh lock: put it back unless yet another lock is already in place.
      try:
        os.link(broken, self.path)
      except FileExistsError:
        pass
    else:
      logging.warning('Taking over the lock of %s from a run that is gone (%s).', self.unit,
                      describe(owner))
    broken.unlink()

  def acquire(self, wait_seconds: float) -> None:
    """Takes the lock, waiting up to `wait_seconds` for a live owner; SurgeryError if it stays."""
    deadline = time.monotonic() + wait_seconds
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      while not self._try_create():
        owner = self.owner()
        if owner is None:
          continue
        if self._gone(owner):
          self._take_over(owner)
          continue
        if time.monotonic() >= deadline:
          raise SurgeryError(
              f'{self.unit} is being written by another run ({describe(owner)}); it stays locked '
              f'until that run ends or is silent for {self.timeout_seconds:.0f} s '
              f'(set output.wait_seconds to wait for it)')
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
      raise SurgeryError(f'cannot write beside {self.unit}: {e.strerror}') from None
    self._heartbeat = threading.Thread(target=self._beat, name='surgery_job_lock', daemon=True)
    self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(max(1.0, self.timeout_seconds / 6)):
      if not self.held():
        owner = self.owner()
        logging.error('Lost the lock of %s to %s.', self.unit,
                      describe(owner) if owner else 'nobody')
        return
      try:
        aside = self._write_aside()
        os.replace(aside, self.path)
      except OSError as e:
        logging.warning('Could not refresh the lock of %s: %s', self.unit, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if self._heartbeat is None:
      return
    self._stop.set()
    self._heartbeat.join(timeout=5)
    if self.held():
      self.path.unlink(missing_ok=True)
