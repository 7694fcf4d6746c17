"""Progress while a group is read, transformed, written and validated: plain lines where stderr
is not a terminal, a bar that a log line never shares where it is."""

import io
import logging as py_logging
import re
import time

import pytest
from absl import logging

from surgery_job import progress as progress_lib
from surgery_job.progress import Progress

MIB = 2 ** 20


def test_plain_lines_name_the_running_phase_and_the_bytes_done(caplog, monkeypatch):
  monkeypatch.setenv(progress_lib.INTERVAL, '0.05')
  caplog.set_level('INFO', logger='absl')  # Whatever verbosity an earlier test left.
  with Progress(read=4 * MIB, written=2 * MIB, groups=2) as progress:
    with progress.phase('restore', 0, 2 * MIB):
      pass
    with progress.phase('write', 0, 1 * MIB):
      time.sleep(0.3)
    progress.group_done(0)
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0] == ('Progress counts 8.00 MiB: the input arrays read (4.00 MiB), the output '
                      'arrays written (2.00 MiB) and read back to validate (2.00 MiB), whole '
                      'arrays over all processes.')
  while_writing = [line for line in lines if line.startswith('Progress: write group 1/2 (')]
  assert while_writing, lines
  assert while_writing[0].split('; ', 1)[1].startswith(
      '2.00 MiB of 8.00 MiB (25%; read 2.00 MiB of 4.00 MiB, written 0 B of 2.00 MiB, '
      'validated 0 B of 2.00 MiB), ')
  assert lines[-1].startswith('Group 1/2 done: 3.00 MiB of 8.00 MiB (38%; read 2.00 MiB of '
                              '4.00 MiB, written 1.00 MiB of 2.00 MiB, validated 0 B of 2.00 MiB)')
  assert lines[-1].endswith(' s left; peak RSS %.2f GiB' % (progress_lib.peak_rss() / 2 ** 30))


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.fixture
def absl_handler():
  """absl's handler on the root logger, as `app.run` puts it there for the job."""
  logging.use_absl_handler()
  yield
  py_logging.getLogger().removeHandler(logging.get_absl_handler())


def test_a_bar_on_a_terminal_is_wiped_before_a_log_line(monkeypatch, absl_handler):
  del absl_handler
  terminal = Terminal()
  monkeypatch.setattr('sys.stderr', terminal)
  with Progress(read=MIB, written=MIB, groups=1) as progress:
    with progress.phase('restore', 0, MIB):
      time.sleep(0.8)  # The bar is drawn every 0.5 s.
    drawn = terminal.getvalue()
    assert drawn.startswith('\r\033[K[') and progress.drawn
    assert re.fullmatch(rf'\[{" " * 12}\]   0% restore group 1/1 \([01] s\), 0 B/3.00 MiB, '
                        r'0.0 MiB/s, ~\? s left', drawn.rsplit('\r\033[K', 1)[1])
    logging.warning('a log line')
    after = terminal.getvalue()[len(drawn):]
    assert after.startswith('\r\033[K') and after.endswith('] a log line\n') and not progress.drawn
    progress.group_done(0)  # No plain line on a terminal: the bar says it.
    assert terminal.getvalue() == drawn + after
  assert terminal.getvalue().endswith('\n')
  assert terminal.getvalue().rsplit('\r\033[K', 1)[1].startswith(f'[{"#" * 4}{" " * 8}]  33% done, 1.00 MiB/3.00 MiB, ')
