"""A new user's first hour: `make demo` in a fresh folder, quiet, each step ending with what it
wrote."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import REPO

VENV = Path(sys.prefix)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """A folder as a fresh clone has it after `make demo` (the set-up already done: this test's
  venv), and what `make demo` printed, one list of lines per command it ran."""
  if not (VENV / 'installed').exists() or VENV.parent != REPO:
    pytest.skip('needs the venv `make setup` made, which make would otherwise rebuild')
  folder = tmp_path_factory.mktemp('clone')
  for name in ('configs', 'setup.py', 'Makefile', '.venv'):
    (folder / name).symlink_to(REPO / name)
  # As in a user's shell: no fake devices or platform set; the Makefile sets its own.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  made = subprocess.run(['make', 'demo'], cwd=folder, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
  steps, lines = {}, None
  for line in made.stdout.splitlines():  # make echoes each command; stderr has what they logged.
    if line.startswith(('rm ', '.venv/bin/')):
      lines = steps.setdefault(line.split()[0].split('/')[-1] + ' ' + line.split()[1], [])
    elif lines is not None and not line.startswith(' '):  # Not an echoed command's next line.
      lines.append(line)
  return folder, steps, made.stderr


def test_make_demo_is_quiet_and_says_what_it_wrote(demo):
  _, steps, stderr = demo
  assert steps['python -m'] == ['Wrote the example CNN checkpoint (params, Adam state, step) to demo_out/cnn']
  assert steps['surgery-job --config=configs/params_only_bf16.py'] == [
      'Wrote demo_out/cnn_serving/1: 9 leaves, 1.57 MiB, validated '
      '(report: demo_out/cnn_serving/1/surgery_report.json)']
  logged = stderr.splitlines()
  assert len(logged) <= 10, stderr
  for noise in ('Unable to initialize backend', 'orbax', 'Cast params/', 'preemption'):
    assert noise not in stderr
  assert sum(line.split('] ', 1)[-1].startswith('Cast 8 leaves: ') for line in logged) == 1
