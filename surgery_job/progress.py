"""Progress of a run on process 0, phase by phase within each group: the arrays' bytes read,
written and read back to validate, the rate and the time left. A bar on a terminal; on anything
else (a log file, a pipe) a plain log line every `SURGERY_JOB_PROGRESS_SECONDS` (default 10)
while a phase runs, and one per group."""

import contextlib
import os
import resource
import shutil
import sys
import threading
import time

import jax
from absl import logging

from surgery_job.cli import human

GIB = 1024 ** 3
INTERVAL = 'SURGERY_JOB_PROGRESS_SECONDS'
# Which of the counted bytes each phase finishes; the transform and the finalize count none.
_COUNTS = {'restore': 'read', 'write': 'written', 'validate': 'validated'}


def peak_rss() -> int:
  """This process's peak resident set size in bytes, as the OS counts it."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Progress:
  """The bytes of whole arrays, over all processes: `read` from the input, `written` to the
  output, then read back (`validated`), over `groups` groups."""

  def __init__(self, read: int, written: int, groups: int):
    self.total = {'read': read, 'written': written, 'validated': written}
    self.done = dict.fromkeys(self.total, 0)
    self.groups, self.start = groups, time.perf_counter()
    self.current: tuple[str, str, float] | None = None  # (phase, which group, since)
    self.reporting = jax.process_index() == 0
    self.bar = self.reporting and sys.stderr.isatty()
    self.drawn = False  # Whether the bar is on the terminal's last line.
    self.lock = threading.Lock()
    self.stopped = threading.Event()
    if not self.reporting:
      return
    logging.info('Progress counts %s: the input arrays read (%s), the output arrays written (%s) '
                 'and read back to validate (%s), whole arrays over all processes.',
                 human(sum(self.total.values())), human(read), human(written), human(written))
    if self.bar:
      # A log line takes the bar's line: the bar is wiped first and drawn again below it.
      logging.get_absl_handler().addFilter(self._wipe)
    interval = 0.5 if self.bar else float(os.environ.get(INTERVAL, 10))
    self.ticker = threading.Thread(target=self._tick, args=(interval,), daemon=True)
    self.ticker.start()

  @contextlib.contextmanager
  def phase(self, name: str, group: int | None, nbytes: int = 0):
    """`name` running on `group` (None: the whole output); its `nbytes` count as done after it."""
    which = '' if group is None else f' group {group + 1}/{self.groups}'
    with self.lock:
      self.current = (name, which, time.perf_counter())
    yield
    with self.lock:
      self.current = None
      if name in _COUNTS:
        self.done[_COUNTS[name]] += nbytes

  def skip(self, read: int, written: int) -> None:
    """A group an earlier run wrote: read and written already."""
    self.done['read'] += read
    self.done['written'] += written

  def group_done(self, group: int) -> None:
    if self.reporting and not self.bar:
      logging.info('Group %d/%d done: %s; peak RSS %.2f GiB', group + 1, self.groups,
                   self._status(), peak_rss() / GIB)

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    self.stopped.set()
    if self.bar:
      self._draw('done')
      with self.lock:
        sys.stderr.write('\n')
        self.drawn = False
      logging.get_absl_handler().removeFilter(self._wipe)

  def _rate_and_left(self) -> tuple[str, str]:
    total, done = sum(self.total.values()), sum(self.done.values())
    elapsed = time.perf_counter() - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    return f'{rate / 2 ** 20:.1f} MiB/s', f'~{(total - done) / rate:.0f} s left' if rate > 0 else '~? s left'

  def _status(self) -> str:
    """Bytes done of the total and of each kind, the rate, the time left."""
    total, done = sum(self.total.values()), sum(self.done.values())
    parts = ', '.join(f'{kind} {human(self.done[kind])} of {human(self.total[kind])}'
                      for kind in self.total)
    return (f'{human(done)} of {human(total)} ({100 * done / max(total, 1):.0f}%; {parts}), '
            + ', '.join(self._rate_and_left()))

  def _running(self) -> str:
    if self.current is None:
      return ''
    name, which, since = self.current
    return f'{name}{which} ({time.perf_counter() - since:.0f} s)'

  def _tick(self, interval: float) -> None:
    while not self.stopped.wait(interval):
      if self.bar:
        self._draw(self._running())
      elif self.current is not None:
        logging.info('Progress: %s; %s', self._running(), self._status())

  def _draw(self, running: str) -> None:
    with self.lock:
      total, done = max(sum(self.total.values()), 1), sum(self.done.values())
      line = (f'[{"#" * (12 * done // total):<12}] {100 * done / total:3.0f}% {running}, '
              f'{human(done)}/{human(total)}, ' + ', '.join(self._rate_and_left()))
      sys.stderr.write('\r\033[K' + line[:shutil.get_terminal_size().columns - 1])
      sys.stderr.flush()
      self.drawn = True

  def _wipe(self, record) -> bool:
    del record
    if self.drawn:
      sys.stderr.write('\r\033[K')
      self.drawn = False
    return True
