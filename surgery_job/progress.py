"""Progress of a streamed run on process 0: a log line per group, and a bar on a terminal."""

import resource
import sys
import time

import jax
from absl import logging

GIB = 1024 ** 3


def peak_rss() -> int:
  """This process's peak resident set size in bytes, as the OS counts it."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Progress:
  """Bytes done of `total_bytes` over `groups` groups, with throughput and time left."""

  def __init__(self, total_bytes: int, groups: int):
    self.total_bytes, self.groups = max(total_bytes, 1), groups
    self.done_bytes, self.start = 0, time.perf_counter()

  def advance(self, group: int, group_bytes: int) -> None:
    self.done_bytes += group_bytes
    if jax.process_index() != 0:
      return
    elapsed = time.perf_counter() - self.start
    rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
    left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
    fraction = self.done_bytes / self.total_bytes
    logging.info('Group %d/%d done: %.2f of %.2f GiB (%.0f%%), %.0f MiB/s, ~%.0f s left; '
                 'peak RSS %.2f GiB', group + 1, self.groups, self.done_bytes / GIB,
                 self.total_bytes / GIB, 100 * fraction, rate / 1024 ** 2, left, peak_rss() / GIB)
    if sys.stderr.isatty():
      bar = '#' * int(30 * fraction)
      sys.stderr.write(f'\r[{bar:<30}] {100 * fraction:3.0f}% ~{left:.0f}s left'
                       + ('\n' if group + 1 == self.groups else ''))
      sys.stderr.flush()
