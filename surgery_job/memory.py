"""Host memory: the budget a run streams under when the user sets none, and keeping RSS at what
the arrays need.

The default budget is a share of what the host really has: the tightest of the cgroup's limit (v2
`memory.max`, v1 `memory.limit_in_bytes`, less what the cgroup already uses) and the kernel's
MemAvailable, split among the job's processes on the host, with headroom: a group costs about twice
its arrays at its peak (Orbax's host copies on restore and on write).

glibc gives busy threads arenas of their own, and memory freed in one arena is neither reused by
the others nor returned to the OS: a streamed run's RSS would creep up group after group.
"""

import contextlib
import ctypes
import gc
import os
import resource
from pathlib import Path

SHARE = 0.4  # Of what a process may use, for the arrays of one group.
# Where the cgroup file system is mounted (a test points it at a fake one).
CGROUP_ROOT = Path(os.environ.get('SURGERY_JOB_CGROUP_ROOT', '/sys/fs/cgroup'))
_NO_LIMIT = 2 ** 60  # cgroup v1 writes a huge number for "no limit".


def _read_int(path: Path) -> int | None:
  with contextlib.suppress(OSError, ValueError):
    return int(path.read_text().split()[0])
  return None


def available() -> tuple[int, str]:
  """(bytes this host lets the job use, where that figure comes from)."""
  found = []
  for limit_file, usage_file, name in (('memory.max', 'memory.current', 'cgroup v2 memory.max'),
                                       ('memory/memory.limit_in_bytes', 'memory/memory.usage_in_bytes',
                                        'cgroup v1 memory.limit_in_bytes')):
    limit = _read_int(CGROUP_ROOT / limit_file)
    if limit is not None and limit < _NO_LIMIT:
      found.append((max(0, limit - (_read_int(CGROUP_ROOT / usage_file) or 0)), name))
  with contextlib.suppress(OSError, StopIteration, ValueError):
    meminfo = Path('/proc/meminfo').read_text().splitlines()
    kib = next(int(line.split()[1]) for line in meminfo if line.startswith('MemAvailable:'))
    found.append((kib * 1024, 'MemAvailable'))
  return min(found) if found else (0, 'nothing readable')


def default_budget(processes_on_host: int) -> tuple[int, str]:
  """(bytes of arrays one group may hold per process, how that was found)."""
  free, source = available()
  budget = int(free * SHARE / processes_on_host)
  return budget, (f'{SHARE:.0%} of {free / 1e9:.2f} GB available ({source}), shared by '
                  f'{processes_on_host} process{"es" if processes_on_host > 1 else ""} on this host')

_M_ARENA_MAX = -8  # glibc's mallopt parameter.


def _libc():
  with contextlib.suppress(OSError):
    return ctypes.CDLL('libc.so.6')
  return None


def few_arenas() -> None:
  """Two malloc arenas, set before the runtime starts its threads (no-op without glibc)."""
  libc = _libc()
  if libc is not None and hasattr(libc, 'mallopt'):
    libc.mallopt(_M_ARENA_MAX, 2)


@contextlib.contextmanager
def long_lived():
  """Within the block, Python's garbage collector leaves alone the objects alive at its start (the
  plan, the metadata, JAX's and Orbax's caches), which live through it anyway: its full scans of
  them took 2 s of a 12 s surgery of 1,000 leaves. Refcounting still frees them."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def release() -> None:
  """Returns memory freed by the last group to the OS (no-op without glibc)."""
  libc = _libc()
  if libc is not None and hasattr(libc, 'malloc_trim'):
    libc.malloc_trim(0)


def peak_rss() -> int:
  """The most memory this process has held at once, in bytes (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
