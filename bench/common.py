"""What the benchmarks share: the environment of 8 fake CPU devices, timing a command, and what the
figures are recorded with."""

import os
import subprocess
import sys
from pathlib import Path

MIB = 1024 ** 2
GIB = 1024 ** 3
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}

MEASURE = ('import resource, subprocess, sys, time; start = time.perf_counter(); '
           'rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; '
           'print(rc, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
  """(wall seconds, peak RSS in GiB) of `command`, run in a fresh process (`env` added to ENV)."""
  out = subprocess.run([sys.executable, '-c', MEASURE, *command], env={**ENV, **(env or {})},
                       capture_output=True, text=True, check=True).stdout.split()
  if out[0] != '0':
    raise SystemExit(f'failed (exit {out[0]}): {" ".join(command)}')
  return float(out[1]), int(out[2]) * 1024 / GIB


def load_average() -> str:
  """The 1, 5 and 15 minute load averages: the machine is shared, and its load moves the figures."""
  return ' '.join(Path('/proc/loadavg').read_text().split()[:3])


def commit() -> str:
  """The commit measured (with '+' when the work tree has changes)."""
  repo = Path(__file__).resolve().parent.parent
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo, capture_output=True,
                        text=True, check=True).stdout.strip()
  changed = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.strip()
  return head + ('+' if changed else '')
