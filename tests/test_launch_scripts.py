"""Checks of the launch/ scripts: syntax, DRY_RUN command lines, the JobSet YAML, and a real
local.sh run with a fake job (no JAX needed)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'
SCRIPTS = sorted([*LAUNCH.glob('*.sh'), *LAUNCH.glob('*.sbatch')])
ARGS = ['--config=c.py', '--config.input.path=/a']


def _run(cmd, timeout=30, **env):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **env}, cwd=LAUNCH.parent)


def test_scripts_found():
  assert {p.name for p in SCRIPTS} == {'find_job.sh', 'local.sh', 'mpirun.sh', 'slurm.sbatch', 'tpu_vm.sh'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = _run(['bash', '-n', str(script)])
  assert result.returncode == 0, result.stderr


def test_local_dry_run():
  result = _run(['bash', str(LAUNCH / 'local.sh'), '2', '--', *ARGS], DRY_RUN='1',
                SURGERY_JOB='python3 -m surgery_job')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2, result.stdout
  coordinators = set()
  for i, line in enumerate(lines):
    assert f'--process_id={i}' in line
    assert '--num_processes=2' in line
    assert 'JAX_PLATFORMS=cpu' in line
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=4' in line
    assert 'python3 -m surgery_job --config=c.py --config.input.path=/a' in line
    coordinators.update(re.findall(r'--coordinator_address=(127\.0\.0\.1:\d+)', line))
  assert len(coordinators) == 1, lines


def test_local_dry_run_env_overrides():
  result = _run(['bash', str(LAUNCH / 'local.sh'), '3', *ARGS], DRY_RUN='1', PORT='12345',
                DEVICES_PER_PROCESS='2', SURGERY_JOB='/venv/bin/python -m surgery_job')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  assert all('--coordinator_address=127.0.0.1:12345' in line for line in lines)
  assert all('device_count=2 ' in line for line in lines)
  assert all('/venv/bin/python -m surgery_job --config=c.py' in line for line in lines)


def _copy_of_launch(tmp_path, venv: bool, on_path: bool) -> tuple[pathlib.Path, dict]:
  """launch/ copied into a fresh repo, with or without a .venv/bin/surgery-job and one on PATH."""
  repo = tmp_path / 'repo'
  shutil.copytree(LAUNCH, repo / 'launch')
  bin_dirs = [repo / '.venv' / 'bin'] if venv else []
  bin_dirs += [tmp_path / 'bin'] if on_path else []
  for bin_dir in bin_dirs:
    bin_dir.mkdir(parents=True)
    (bin_dir / 'surgery-job').write_text('#!/bin/sh\n')
    (bin_dir / 'surgery-job').chmod(0o755)
  # A PATH whose python3 cannot import surgery_job (no venv of the project on it).
  env = {'PATH': os.pathsep.join([str(tmp_path / 'bin'), '/usr/bin', '/bin']), 'DRY_RUN': '1'}
  return repo, env


@pytest.mark.parametrize('script', ['local.sh', 'mpirun.sh'])
@pytest.mark.parametrize('venv,on_path,want', [
    (True, True, '{repo}/.venv/bin/surgery-job --x=1'),
    (False, True, 'surgery-job --x=1'),
])
def test_finds_the_installed_job(script, venv, on_path, want, tmp_path):
  repo, env = _copy_of_launch(tmp_path, venv, on_path)
  result = subprocess.run(['bash', str(repo / 'launch' / script), '2', '--', '--x=1'],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != 'SURGERY_JOB'} | env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(want.format(repo=repo) in line for line in lines), lines
  explicit = subprocess.run(['bash', str(repo / 'launch' / script), '2', '--', '--x=1'],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env={**os.environ, **env, 'SURGERY_JOB': '/my/python -m surgery_job'})
  assert all('/my/python -m surgery_job --x=1' in line for line in explicit.stdout.splitlines())


def test_slurm_finds_the_job_installed_in_the_submit_directory(tmp_path):
  # sbatch runs a copy of the script from its spool directory: the submit directory is the repo.
  repo, env = _copy_of_launch(tmp_path, venv=True, on_path=True)
  copy = tmp_path / 'spool' / 'slurm_script'
  copy.parent.mkdir()
  shutil.copy(repo / 'launch' / 'slurm.sbatch', copy)
  result = subprocess.run(['bash', str(copy), '--x=1'], capture_output=True, text=True, timeout=30,
                          cwd=repo, env={k: v for k, v in os.environ.items() if k != 'SURGERY_JOB'}
                          | env | {'SLURM_SUBMIT_DIR': str(repo)})
  assert result.returncode == 0, result.stderr
  assert result.stdout.rstrip().endswith(f'{repo}/.venv/bin/surgery-job --x=1'), result.stdout


@pytest.mark.parametrize('script', ['local.sh', 'mpirun.sh'])
def test_says_how_to_install_when_no_job_is_found(script, tmp_path):
  repo, env = _copy_of_launch(tmp_path, venv=False, on_path=False)
  result = subprocess.run(['bash', str(repo / 'launch' / script), '2', '--', '--x=1'],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != 'SURGERY_JOB'} | env)
  assert result.returncode == 2
  assert 'make setup' in result.stderr and 'SURGERY_JOB' in result.stderr, result.stderr


def test_local_rejects_bad_n():
  result = _run(['bash', str(LAUNCH / 'local.sh'), 'two'], DRY_RUN='1')
  assert result.returncode == 2
  assert not result.stdout


def test_slurm_dry_run():
  result = _run(['bash', str(LAUNCH / 'slurm.sbatch'), '--', *ARGS], DRY_RUN='1',
                SURGERY_JOB='python3 -m surgery_job')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 1
  assert lines[0].startswith('srun --kill-on-bad-exit=1 ')
  assert '%x-%j-%t.log' in lines[0]
  assert lines[0].endswith('python3 -m surgery_job --config=c.py --config.input.path=/a')
  assert '--coordinator_address' not in lines[0]


def test_mpirun_dry_run():
  result = _run(['bash', str(LAUNCH / 'mpirun.sh'), '2', '--', *ARGS], DRY_RUN='1',
                SURGERY_JOB='python3 -m surgery_job', SURGERY_JOB_FAULT='transform@1')
  assert result.returncode == 0, result.stderr
  [line] = result.stdout.splitlines()
  assert line.startswith('mpirun -np 2 --oversubscribe ')
  assert '-x SURGERY_JOB_FAULT' in line
  assert line.endswith("logs/mpirun python3 -m surgery_job --config=c.py --config.input.path=/a")
  assert '--coordinator_address' not in line
  hosts = _run(['bash', str(LAUNCH / 'mpirun.sh'), '8', *ARGS], DRY_RUN='1',
               MPIRUN_ARGS='--hostfile hosts --map-by ppr:1:node')
  assert hosts.stdout.startswith('mpirun -np 8 --hostfile hosts --map-by ppr:1:node '), hosts.stdout


def test_tpu_vm_dry_run():
  result = _run(['bash', str(LAUNCH / 'tpu_vm.sh'), 'my-tpu', 'us-central2-b', '--', *ARGS,
                 'two words'], DRY_RUN='1', PROJECT='my-project')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert out.startswith('gcloud compute tpus tpu-vm ssh my-tpu ')
  for part in ('--zone=us-central2-b', '--worker=all', '--project=my-project',
               'python3 -m surgery_job --config=c.py --config.input.path=/a',
               'logs/worker_$(hostname).log'):
    assert part in out, out
  assert r'two\ words' in out  # quoted for the remote shell


def test_tpu_vm_needs_name_and_zone():
  result = _run(['bash', str(LAUNCH / 'tpu_vm.sh'), 'my-tpu'], DRY_RUN='1')
  assert result.returncode == 2


def test_jobset_yaml():
  yaml = pytest.importorskip('yaml')
  docs = [d for d in yaml.safe_load_all((LAUNCH / 'k8s' / 'jobset.yaml').read_text()) if d]
  by_kind = {d['kind']: d for d in docs}
  assert by_kind['ServiceAccount']['metadata']['name'] == 'surgery-job'
  jobset = by_kind['JobSet']
  assert jobset['apiVersion'] == 'jobset.x-k8s.io/v1alpha2'
  [rjob] = jobset['spec']['replicatedJobs']
  job = rjob['template']['spec']
  assert job['parallelism'] == job['completions']
  assert job['completionMode'] == 'Indexed' and job['backoffLimit'] == 0
  pod = job['template']['spec']
  assert pod['serviceAccountName'] == 'surgery-job'
  [container] = pod['containers']
  command = ' '.join(container['command'] + container.get('args', []))
  assert 'surgery_job' in command
  assert f"--num_processes={job['parallelism']}" in command
  env = {e['name']: e.get('value') for e in container['env']}
  name = jobset['metadata']['name']
  assert env['JAX_COORDINATOR_ADDRESS'] == f"{name}-{rjob['name']}-0-0.{name}:1234"


@pytest.mark.parametrize('name', ['cronjob.yaml', 'sidecar.yaml'])
def test_export_yamls_name_real_configs_and_fields(name):
  yaml = pytest.importorskip('yaml')
  from surgery_job import config as config_lib  # pylint: disable=import-outside-toplevel
  [doc] = [d for d in yaml.safe_load_all((LAUNCH / 'k8s' / name).read_text()) if d]
  pod = doc['spec']['jobTemplate']['spec']['template']['spec'] if doc['kind'] == 'CronJob' else doc['spec']
  [container] = [c for c in pod['containers'] if 'surgery_job' in c.get('command', [])]
  overrides = dict(a[len('--config.'):].split('=', 1) for a in container['command']
                   if a.startswith('--config.'))
  assert overrides['input.path'] != overrides['output.path']
  defaults = config_lib.get_default_config()
  for field, value in overrides.items():
    group, key = field.split('.')
    assert key in defaults[group], field
  config_file = next(a for a in container['command'] if a.startswith('--config='))
  assert (LAUNCH.parent / 'configs' / config_file.rsplit('/', 1)[1]).is_file()


FAKE_JOB = '''\
import sys, time
process_id = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--process_id='))
print('fake job', process_id, ' '.join(sys.argv[1:]), flush=True)
if process_id == '1':
  print('the reason it failed', file=sys.stderr)
  sys.exit(3)
time.sleep(300)
'''


def _alive(pattern):
  if not shutil.which('pgrep'):
    return ''
  return subprocess.run(['pgrep', '-f', pattern], capture_output=True, text=True).stdout


def test_local_stops_all_on_first_failure(tmp_path):
  fake = tmp_path / 'fake_job.py'
  fake.write_text(FAKE_JOB)
  log_dir = tmp_path / 'logs'
  start = time.monotonic()
  result = _run(['bash', str(LAUNCH / 'local.sh'), '3', '--', '--config=c.py'], timeout=60,
                SURGERY_JOB=f'{sys.executable} {fake}', GRACE_SECONDS='2', LOG_DIR=str(log_dir))
  elapsed = time.monotonic() - start
  output = result.stdout + result.stderr
  assert result.returncode == 3, output
  assert elapsed < 20, elapsed
  assert re.search(r'process 1 failed with exit code 3.*process_1\.log', output), output
  assert '  | the reason it failed' in result.stderr  # the end of its log, not only its path
  assert 'fake job 0 --config=c.py' in result.stdout  # process 0 is echoed to the terminal
  assert sorted(p.name for p in log_dir.iterdir()) == [f'process_{i}.log' for i in range(3)]
  for i in range(3):
    assert f'fake job {i} --config=c.py' in (log_dir / f'process_{i}.log').read_text()
  assert not _alive(str(fake)), 'fake processes were left running'


def test_local_all_succeed(tmp_path):
  result = _run(['bash', str(LAUNCH / 'local.sh'), '2', '--', '--x=1'], timeout=30,
                SURGERY_JOB=f'{sys.executable} -c pass', LOG_DIR=str(tmp_path / 'logs'))
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'failed' not in result.stderr
  assert len(list((tmp_path / 'logs').iterdir())) == 2
