"""SIGTERM (or Ctrl-C: SIGINT) at any moment: exit 75 (130) with nothing half-committed, within a
bounded time; a rerun resumes from the groups already written.

The signal is only recorded; the run stops where it checks (`check`, `sleep`: each
phase, each group, each wait), never inside whatever Python code the signal happened to land in.
An exception raised from the handler itself lands anywhere, in a garbage-collection callback or an
asyncio callback of Orbax's, which swallow it: the run would go on and print a traceback.

Python runs a signal handler only once the main thread is back in Python code, which a long XLA
call or a barrier can put off for minutes, and then wherever that thread was, maybe holding a lock
(logging's) that recording the stop would wait for. So the C-level handler writes the signal into
a pipe (`signal.set_wakeup_fd`), and a thread that reads it at once records it (the Python
handler does nothing) and bounds the stop: after `stop_timeout_seconds` it ends the process itself. A SIGTERM during a commit lets it finish, and
the run stops before its next step; once the run has nothing left to do, it ends as done (0).
SIGINT is handled the same way: Python's own KeyboardInterrupt would land inside Orbax's or XLA's
callbacks (a C++ `terminate`) as any exception raised from a handler does.
"""

import contextlib
import os
import signal
import threading
from typing import Callable

from absl import logging

EXIT_DONE = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped, nothing committed; run it again.
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it (128 + SIGINT); nothing committed either.
SIGNALS = (signal.SIGTERM, signal.SIGINT)

requested = threading.Event()
received: list[signal.Signals] = []  # The signal that stopped the run, once one came.
finished = threading.Event()  # Every output is committed, or there was nothing to do.
_commit = threading.Lock()  # Held for the whole commit, so that a forced stop waits for it.
_in_commit = False


class Preempted(BaseException):
  """Raised where the run checks for SIGTERM; a BaseException so no `except Exception` swallows
  it."""


def exit_code() -> int:
  """The code a run ends with once SIGTERM or SIGINT arrived."""
  if finished.is_set():
    return EXIT_DONE
  return EXIT_INTERRUPTED if received == [signal.SIGINT] else EXIT_PREEMPTED


def name() -> str:
  """The signal that stopped the run, as messages name it."""
  return received[0].name if received else 'SIGTERM'


def install(stop_timeout_seconds: int, stop: Callable[[int, str], None]) -> None:
  """Handles SIGTERM and SIGINT from now on (main thread only; SIGINT unless it is ignored, as
  under nohup); `stop(code, message)` ends the process."""
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  signal.set_wakeup_fd(write_end)
  for signum in SIGNALS:
    if signal.getsignal(signum) is not signal.SIG_IGN:
      signal.signal(signum, lambda signum, frame: None)

  def force_stop():
    with _commit:
      stop(exit_code(), f'stopped by {name()}')

  def watch():
    while True:
      arrived = os.read(read_end, 64)
      found = [signum for signum in SIGNALS if signum in arrived]
      if found:
        received.append(found[0])
        requested.set()
        logging.warning('%s received (%s): stopping%s.', name(),
                        'Ctrl-C' if received == [signal.SIGINT] else 'preemption?',
                        '' if finished.is_set() else ' before the next commit')
        threading.Timer(stop_timeout_seconds, force_stop).start()
        return

  threading.Thread(target=watch, name='surgery_job_sigterm', daemon=True).start()


def finish() -> None:
  """The run has nothing left to do: a signal from now on changes nothing. It is ignored, not
  handled, because Python gives a handled signal back its default (death) while it shuts down."""
  finished.set()
  for signum in SIGNALS:
    signal.signal(signum, signal.SIG_IGN)


def check() -> None:
  """Stops here if SIGTERM or SIGINT came, unless a commit is under way or the run is done."""
  if requested.is_set() and not (_in_commit or finished.is_set()):
    raise Preempted()


def sleep(seconds: float) -> None:
  """`time.sleep`, cut short by SIGTERM or SIGINT to stop here."""
  requested.wait(seconds)
  check()


@contextlib.contextmanager
def committing():
  """A commit: a signal waits for it to end (`check` stops the run after it)."""
  global _in_commit  # pylint: disable=global-statement
  with _commit:
    _in_commit = True
    try:
      yield
    finally:
      _in_commit = False
