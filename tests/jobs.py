"""Runs surgery_job as users do: a subprocess, a config file, command-line overrides; several
processes through launch/local.sh; refusals in this process through the command's own entry points."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections

from surgery_job import config as config_lib, job
from surgery_job.errors import SurgeryError

REPO = Path(__file__).resolve().parent.parent
JOB = f'{sys.executable} -m surgery_job'


def write_config(directory: Path, config: dict, name: str = 'config.py') -> Path:
  """A bare config file: it sets only what it needs, the job fills in the defaults."""
  path = directory / name
  path.write_text('import ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict({config!r})\n')
  return path


def job_command(config_file, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'surgery_job', f'--config={config_file}', *overrides]


def job_env(devices: int = 8, env: dict | None = None) -> dict:
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'JAX_PLATFORMS': 'cpu', **(env or {})}


def run_job(config_file, *overrides: str, devices: int = 8, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(job_command(config_file, *overrides), cwd=REPO, env=job_env(devices, env),
                        capture_output=True, text=True, timeout=timeout, check=False)


def launch(processes: int, *args: str, log_dir, devices_per_process: int = 4, command: str = JOB,
           env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  """`launch/local.sh processes -- args`: that many processes joined on 127.0.0.1."""
  full_env = {**os.environ, 'SURGERY_JOB': command, 'LOG_DIR': str(log_dir),
              'DEVICES_PER_PROCESS': str(devices_per_process), **(env or {})}
  return subprocess.run(['bash', str(REPO / 'launch' / 'local.sh'), str(processes), '--', *args],
                        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                        check=False)


def outcome(fields: dict) -> str:
  """'ok', or 'error: ' and the line the command prints after 'surgery-job: error: ': `fields` run
  in this process as the command runs a config file's ConfigDict (`config.with_defaults`, what flag
  parsing does, then `job.run`). A SurgeryError is the command's exit 2; any other exception, its
  exit 1 with a traceback, is raised. For refusals found before any data moves: no process to start."""
  x64 = jax.config.jax_enable_x64
  try:
    job.run(config_lib.with_defaults(ml_collections.ConfigDict(fields)))
  except SurgeryError as e:
    return f'error: {e}'
  finally:
    jax.config.update('jax_enable_x64', x64)  # job.run turns it on; the tests here expect it off.
  return 'ok'


def surgery(tmp_path: Path, input_path, transforms: list, **fields) -> tuple[Path, subprocess.CompletedProcess]:
  """Runs `transforms` on `input_path` into tmp_path/out; returns the output path and the process."""
  out = tmp_path / 'out'
  config_file = write_config(tmp_path, {'transforms': transforms, **fields})
  result = run_job(config_file, f'--config.input.path={input_path}', f'--config.output.path={out}')
  return out, result


def ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, result.stderr[-4000:]


def assert_unlocked(out: Path) -> None:
  """No run holds a lock in the output folder `out`."""
  assert not list(out.glob('*.surgery-lock*')), list(out.iterdir())
