"""The job under a real Slurm and a real Open MPI, started the way users start it (`sbatch
launch/slurm.sbatch`, `launch/mpirun.sh`): JAX's own cluster detection joins the 2 processes (no
coordinator flags), on the checkpoint written by 2 processes; the output is read back leaf by leaf
with plain Orbax and compared with numpy. Also `launch/local.sh` exactly as the README has it.

Slurm is a one-node cluster that `.ci/local_slurm.sh` starts once for the session (its own munge,
config and ports, as root). Debian's slurm-wlm, munge and openmpi-bin must be installed (`.ci/run`
installs them); without them these tests skip, and under CI (`CI` set) they fail instead.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
from jobs import REPO, ok, write_config
from test_ops import CASES, check_case

JOB = f'{sys.executable} -m surgery_job'
# Each of the 2 processes: 4 fake CPU devices, 8 in all, the checkpoint's 2x4 mesh.
TASK_ENV = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu',
            'SURGERY_JOB': JOB}
JOINED = 'jax.distributed initialised; 2 processes, 4 local / 8 global cpu devices'
FAULT = 'transform@1'


def _need(commands: list[str], packages: str, root: bool = False) -> None:
  if missing := [c for c in commands if not shutil.which(c)]:
    _fail_or_skip(f'{", ".join(missing)} not found: apt-get install -y {packages} (as .ci/run does)')
  if root and os.geteuid() != 0:
    _fail_or_skip('needs root to start slurmd (.ci/run runs as root)')


def _fail_or_skip(why: str) -> None:
  if os.environ.get('CI'):
    pytest.fail(f'{why}; CI must run these tests, not skip them')
  pytest.skip(why)


def _env(**extra) -> dict:
  return {**{k: v for k, v in os.environ.items() if not k.startswith('SURGERY_JOB')}, **TASK_ENV, **extra}


def _config(tmp_path):
  return write_config(tmp_path, {'transforms': CASES['rename'][0]})


def _no_process_left(out) -> None:
  left = subprocess.run(['pgrep', '-af', str(out)], capture_output=True, text=True).stdout
  assert not left, f'processes left running:\n{left}'


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
  """A one-node Slurm cluster for the whole session; the environment that reaches it."""
  _need(['sbatch', 'srun', 'sinfo', 'scancel', 'slurmctld', 'slurmd', 'munged'], 'slurm-wlm munge',
        root=True)
  directory = tmp_path_factory.mktemp('slurm')
  script = REPO / '.ci' / 'local_slurm.sh'
  try:
    started = subprocess.run(['bash', str(script), 'start', str(directory)], capture_output=True,
                             text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {'SLURM_CONF': str(directory / 'slurm.conf')}
  finally:
    subprocess.run(['scancel', '--user=root'], env=_env(SLURM_CONF=str(directory / 'slurm.conf')),
                   capture_output=True, timeout=30, check=False)
    subprocess.run(['bash', str(script), 'stop', str(directory)], timeout=60, check=False)


def sbatch(slurm_env: dict, tmp_path, in_path, **extra) -> tuple[subprocess.CompletedProcess, str]:
  """`sbatch --wait` of launch/slurm.sbatch with 2 tasks on the one node; the run and its batch output."""
  logs = tmp_path / 'logs'
  logs.mkdir()  # Slurm opens --output there before the script runs.
  result = subprocess.run(
      ['sbatch', '--wait', '--nodes=1', '--ntasks-per-node=2', '--time=5', f'--output={logs}/%x-%j.out',
       str(REPO / 'launch' / 'slurm.sbatch'), f'--config={_config(tmp_path)}',
       f'--config.input.path={in_path}', f'--config.output.path={tmp_path / "out"}'],
      cwd=REPO, env=_env(**slurm_env, LOG_DIR=str(logs), **extra), capture_output=True, text=True,
      timeout=300, check=False)
  [batch_output] = logs.glob('*.out')
  return result, batch_output.read_text()


def _tasks_srun_saw_fail(batch_output: str) -> set[int]:
  """srun's own account of the tasks that ended badly: `task 1: Exited with exit code 1`,
  `tasks 0-1: Exited with exit code 1`, `task 0: Terminated`, ..."""
  failed = set()
  for ranges in re.findall(r'tasks? ([\d,-]+): (?:Exited with exit code [1-9]|Killed|Terminated)',
                           batch_output):
    for part in ranges.split(','):
      first, _, last = part.partition('-')
      failed.update(range(int(first), int(last or first) + 1))
  return failed


def test_slurm_runs_the_job(slurm, two_process_checkpoint, tmp_path):
  in_path, x = two_process_checkpoint
  result, batch_output = sbatch(slurm, tmp_path, in_path)
  assert result.returncode == 0, batch_output + result.stderr
  task_logs = sorted((tmp_path / 'logs').glob('surgery-job-*-*.log'))
  assert len(task_logs) == 2, batch_output
  assert JOINED in task_logs[0].read_text()
  check_case('rename', tmp_path / 'out' / '3' / 'default', x)


def test_slurm_one_failing_task_stops_every_task(slurm, two_process_checkpoint, tmp_path):
  in_path, _ = two_process_checkpoint
  start = time.monotonic()
  result, batch_output = sbatch(slurm, tmp_path, in_path, SURGERY_JOB_FAULT=FAULT)
  elapsed = time.monotonic() - start
  assert result.returncode != 0, batch_output
  assert _tasks_srun_saw_fail(batch_output) == {0, 1}, batch_output
  assert 'injected fault at transform on process 1' in batch_output  # the end of its log, shown
  assert elapsed < 120
  assert checkpoints.visible_steps(tmp_path / 'out') == []
  _no_process_left(tmp_path / 'out')


@pytest.fixture(scope='session')
def open_mpi():
  _need(['mpirun'], 'openmpi-bin')


def test_local_sh_runs_the_installed_job_as_the_readme_says(two_process_checkpoint, tmp_path):
  """The README's command as written: no SURGERY_JOB, no XLA_FLAGS; local.sh finds REPO/.venv."""
  if not (REPO / '.venv' / 'bin' / 'surgery-job').exists():
    _fail_or_skip(f'no {REPO}/.venv/bin/surgery-job: run make setup')
  in_path, x = two_process_checkpoint
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SURGERY_JOB', 'XLA_', 'JAX_'))}
  result = subprocess.run(
      ['launch/local.sh', '2', '--', '--config=configs/identity.py', f'--config.input.path={in_path}',
       f'--config.output.path={tmp_path / "out"}'],
      cwd=REPO, env={**env, 'LOG_DIR': str(tmp_path / 'logs')}, capture_output=True, text=True,
      timeout=300, check=False)
  ok(result)
  assert str(REPO / '.venv' / 'bin' / 'surgery-job') in subprocess.run(
      ['launch/local.sh', '2', '--'], cwd=REPO, env={**env, 'DRY_RUN': '1'}, capture_output=True,
      text=True, timeout=30, check=True).stdout
  got = checkpoints.flat_numpy(checkpoints.restore_plain(tmp_path / 'out' / '3' / 'default'))
  assert sorted(got) == sorted(x)
  for key, value in x.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def mpirun(tmp_path, in_path, **extra) -> subprocess.CompletedProcess:
  return subprocess.run(
      ['bash', str(REPO / 'launch' / 'mpirun.sh'), '2', '--', f'--config={_config(tmp_path)}',
       f'--config.input.path={in_path}', f'--config.output.path={tmp_path / "out"}'],
      cwd=REPO, env=_env(LOG_DIR=str(tmp_path / 'logs'), **extra), capture_output=True, text=True,
      timeout=300, check=False)


def test_mpirun_runs_the_job(open_mpi, two_process_checkpoint, tmp_path):
  in_path, x = two_process_checkpoint
  result = mpirun(tmp_path, in_path)
  ok(result)
  assert JOINED in (tmp_path / 'logs' / 'process_0.log').read_text()
  check_case('rename', tmp_path / 'out' / '3' / 'default', x)


def test_mpirun_one_failing_process_stops_every_process(open_mpi, two_process_checkpoint, tmp_path):
  in_path, _ = two_process_checkpoint
  start = time.monotonic()
  result = mpirun(tmp_path, in_path, SURGERY_JOB_FAULT=FAULT)
  elapsed = time.monotonic() - start
  assert result.returncode != 0, result.stderr
  assert elapsed < 120
  logs = tmp_path / 'logs'
  assert 'injected fault at transform on process 1' in (logs / 'process_1.log').read_text()
  # Process 0 stops by itself (the job's watchdog) or by mpirun's SIGTERM, whichever comes first.
  assert re.search(r'Process 1 failed .*stopping process 0|SIGTERM received',
                   (logs / 'process_0.log').read_text()), result.stderr
  assert checkpoints.visible_steps(tmp_path / 'out') == []
  _no_process_left(tmp_path / 'out')
