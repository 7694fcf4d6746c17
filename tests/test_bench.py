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
  for row in ('| (a) naive Orbax script |', '| (b) job, rename |', '| (c) job, params_only_bf16 |',
              '| (b0) job, rename, decoded and encoded |', '| (c0) job, params only, no cast |',
              '| (d) cp -r + sync |', 'b/a = ', '| 14 |', 'safetensors export of 0.00 GiB of params',
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
