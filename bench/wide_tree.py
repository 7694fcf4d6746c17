"""Wall time and peak RSS of the identity surgery of a tree of many small leaves.

  .venv/bin/python bench/wide_tree.py [--dir=/tmp/surgery_wide] [--leaves=10000]

Builds a CheckpointManager checkpoint (step 1) of `--leaves` float32 leaves of 4 elements each
(`params/block_I/w_J`, 160 KB of data for 10,000), then runs `configs/identity.py` on it with 8
fake CPU devices. Peak RSS is the OS's figure for the job process (`getrusage` of the child).
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
REPO = Path(__file__).resolve().parent.parent

BUILD = textwrap.dedent('''
    import sys
    import numpy as np, orbax.checkpoint as ocp
    path, leaves = sys.argv[1], int(sys.argv[2])
    params = {}
    for i in range(leaves):
      params.setdefault(f'block_{i // 100}', {})[f'w_{i % 100}'] = np.full((4,), i, np.float32)
    with ocp.CheckpointManager(path) as manager:
      manager.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave({'params': params})))
      manager.wait_until_finished()
''')


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--dir', default='/tmp/surgery_wide')
  parser.add_argument('--leaves', type=int, default=10000)
  args = parser.parse_args()
  work = Path(args.dir)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  subprocess.run([sys.executable, '-c', BUILD, str(work / 'ckpt'), str(args.leaves)], env=ENV,
                 check=True, capture_output=True)
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'surgery_job', '--config=configs/identity.py',
                  f'--config.input.path={work / "ckpt"}', f'--config.output.path={work / "out"}'],
                 cwd=REPO, env=ENV, check=True, capture_output=True)
  seconds = time.perf_counter() - start
  peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1024 ** 3
  print(f'{args.leaves} leaves: {seconds:.1f} s, peak RSS {peak_gib:.2f} GiB')


if __name__ == '__main__':
  main()
