"""Peak RSS and wall time of the job with and without `memory.host_budget_gb`.

  .venv/bin/python bench/memory.py [--dir=/tmp/surgery_bench] [--gib=4] [--budget_gb=0.5]

Builds a float32 checkpoint of at least `--gib` GiB (4 leaves of 320 MiB, the rest 64 MiB leaves),
sharded over a ('data', 'model') 2x4 mesh of 8 fake CPU devices, then runs the same surgery (cast
the large leaves to bfloat16, scale some, rename the rest) once with the budget and once without.
Peak RSS is the OS's figure for each job process (`getrusage` of the child).
"""

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from common import ENV, GIB, measure
from surgery_job import report

BUILD = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    path, gib = sys.argv[1], float(sys.argv[2])
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P('data', 'model'))
    shapes = {f'big_{i}/w': (320 * 256, 1024) for i in range(4)}   # 320 MiB each
    rest = int(gib * 1024) - 4 * 320
    shapes.update({f'layer_{i}/w': (64 * 256, 1024) for i in range((rest + 63) // 64)})  # 64 MiB each
    @jax.jit
    def make(seed):
      return {k: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), s, jnp.float32)
              for i, (k, s) in enumerate(sorted(shapes.items()))}
    make = jax.jit(make.__wrapped__, out_shardings={k: sharding for k in shapes})
    params = {}
    with ocp.CheckpointManager(path) as manager:
      state = {'params': {k.split('/')[0]: {'w': v} for k, v in make(0).items()},
               'step': jnp.asarray(1, jnp.int32)}
      manager.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
      manager.wait_until_finished()
    print(len(shapes), sum(np.prod(s) * 4 for s in shapes.values()))
''')

CONFIG = textwrap.dedent('''
    import ml_collections
    def get_config():
      return ml_collections.ConfigDict({'transforms': [
          dict(op='cast', pattern=r'big_\\d+/w', dtype='bfloat16'),
          dict(op='scale', pattern=r'layer_[0-4]/w', factor=0.5),
          dict(op='rename', pattern=r'layer_(\\d+)/w', replacement=r'layer_\\1/kernel'),
      ]})
''')

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/surgery_bench')
  parser.add_argument('--gib', type=float, default=4.0)
  parser.add_argument('--budget_gb', type=float, default=0.5)
  args = parser.parse_args()
  root = Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  start = time.perf_counter()
  leaves, size = subprocess.run([sys.executable, '-c', BUILD, str(root / 'in'), str(args.gib)],
                                env=ENV, capture_output=True, text=True, check=True).stdout.split()
  print(f'checkpoint: {leaves} leaves, {int(size) / GIB:.2f} GiB, built in {time.perf_counter() - start:.0f} s')
  (root / 'config.py').write_text(CONFIG)
  job = [sys.executable, '-m', 'surgery_job', f'--config={root / "config.py"}',
         f'--config.input.path={root / "in"}']
  results = {}
  for name, extra in (('budget', [f'--config.memory.host_budget_gb={args.budget_gb}']),
                      ('unbounded', ['--config.memory.host_budget_gb=0'])):
    wall, rss = measure(job + [f'--config.output.path={root / name}'] + extra)
    groups = len(json.loads(report.find(root / name).read_text())['groups'])
    results[name] = (wall, rss)
    print(f'{name:>9}: peak RSS {rss:.2f} GiB, wall {wall:.1f} s, {groups} groups')
    shutil.rmtree(root / name)
  (bw, br), (uw, ur) = results['budget'], results['unbounded']
  print(f'budget {args.budget_gb} GiB vs unbounded: peak RSS x{br / ur:.2f}, wall time x{bw / uw:.2f}')


if __name__ == '__main__':
  main()
