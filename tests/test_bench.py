"""The benchmarks run end to end on a tiny checkpoint (their figures are not checked)."""

import subprocess
import sys

from jobs import REPO, job_env


def test_throughput_benchmark_runs(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'throughput.py'), f'--dir={tmp_path / "bench"}',
       '--gib=0.002', '--runs=1', '--leaves=12', '--safetensors_gib=0.002', '--llama_gib=0.0005'],
      cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ('| (a) naive rename: restore all, rename, save |', '| (b) job, rename |',
              '| (c) job, params_only_bf16 |', '| (b0) job, rename, decoded and encoded |',
              '| (a1) naive serving export: restore all, params to bf16, save |',
              '| (a2) naive params only: restore all, save the params |',
              '| (c0) job, params only, no cast |', '| (d) cp -r + sync |',
              '| (d0) cp -r + sync of the params (c0) keeps |', 'b/a = ', 'c/a1 = ', '(c0 - s)/d0 = ',
              '| 14 |', 'safetensors export of 0.00 GiB of params',
              '| (e) naive: restore all, np.asarray, save_file |', '| (f) job, export_safetensors |',
              'MaxText Llama (3 layers',
              '| (g) naive: restore all, numpy formulas, save_file |', '| (h) job, maxtext_llama_to_hf |',
              '| (i) naive: restore all 4, average, save |', '| (j) job, average_last_n:4 |'):
    assert row in result.stdout, result.stdout


def test_object_store_benchmark_runs(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'object_store.py'), f'--dir={tmp_path / "bench"}',
       '--mib=2', '--runs=1', '--leaves=60'],
      cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ('EMULATOR FIGURES', '| local -> local |', '| gs -> gs |', '| local -> gs |',
              '| gs -> local |', '| 32 |', '| 62 |'):
    assert row in result.stdout, result.stdout


def test_scaling_benchmark_runs(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'scaling.py'), f'--dir={tmp_path / "bench"}',
       '--gib=0.004', '--naive_max_gib=0.004', '--processes=2', '--processes_gib=0.004',
       '--leaves=12', '--leaves_gib=0.002'],
      cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ('| size | (b) job, rename | 0.00 | 5 | 1 |', '| leaves | (c0) job, params only | 0.00 | 14 | 1 |',
              '| (d) cp -r + sync |', '| (a) naive rename |', '| processes | (b) job, rename | 0.00 | 5 | 2 |',
              'least squares over 3 one-process rows', '| processes | 0.00 | 5 | 2 |',
              '1 TB in 2200 leaves on 64 hosts', '83 B params, about 167 GB on one host'):
    assert row in result.stdout, result.stdout
  assert not (tmp_path / 'bench' / 'in_0.004').exists()
