"""Throughput and peak RSS of the job by checkpoint size and by number of processes, and a cost
model fitted to them.

  .venv/bin/python bench/scaling.py [--dir=/tmp/surgery_scaling] [--gib=1,2,4,8] [--budget_gb=0.5]
                                    [--naive_max_gib=2] [--processes=1,2,4] [--processes_gib=2]
                                    [--leaves=1000] [--leaves_gib=0.25] [--runs=1]
                                    [--predict_tb=1] [--predict_hosts=64] [--predict_leaves=2200]
                                    [--host_gbps=0.3,1]

Each checkpoint holds float32 params in leaves of 64 MiB (smaller below 0.75 GiB) and their Adam
moments after one step (random, so zstd packs none of it), sharded over a ('data', 'model') 2x4
mesh of 8 fake CPU devices. It is built 256 MiB of params at a time with Orbax's partial saves, so
that building 8 GiB holds a group or two with their moments, not the checkpoint (3.7 GiB peak).
By size (`--gib`), each job under `memory.host_budget_gb=--budget_gb`, `--runs` runs interleaved:
  (b) the job renaming every param, (c0) the job keeping the params only (`drop_optimizer`),
  (d) `cp -r` + `sync`, and (a) the naive rename script of bench/throughput.py up to
  `--naive_max_gib` (it holds the whole checkpoint, and a copy at its peak: not above a few GiB on
  a shared 24 GiB machine).
By processes (`--processes`, on the `--processes_gib` checkpoint): (b) and (c0) through
launch/local.sh, N processes joined on 127.0.0.1 with 8/N fake devices each (the mesh stays 8).
By leaves: (b) and (c0) on `--leaves_gib` GiB cut into `--leaves` leaves, and on a tiny
checkpoint (the start-up, and the fixed RSS that every job row's peak is held against: 1.5x the
budget plus that).
Then fits time = start-up + bytes x seconds per byte + leaves x seconds per leaf to the
one-process rows of each job by least squares, shows every row against it (N processes: the tiny
checkpoint's start-up on N, bytes at min(N x the per-process bandwidth, the best aggregate
seen)), and predicts `--predict_tb` TB in
`--predict_leaves` leaves on `--predict_hosts` hosts at each of `--host_gbps` GB/s of storage per
host.
"""

import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from common import GIB, commit, load_average, measure
from throughput import REPO, copy_and_sync, disk_mib, job, median_runs, write_scripts

# `params` float32 leaves of (rows, 1024) and their Adam moments (as after one step from random
# gradients), saved 256 MiB of params at a time: the builder never holds the whole checkpoint.
BUILD = textwrap.dedent('''
    import json, os, sys
    import jax, numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from orbax.checkpoint.experimental import v1
    from orbax.checkpoint.experimental.v1 import options, partial
    from surgery_job.checkpoint import CHECKPOINT_METADATA, STANDARD_HANDLER
    path, params, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P('data', 'model')))
    per_save = max(1, 2**28 // (rows * 1024 * 4))
    rng = np.random.default_rng(0)
    # As Orbax's StandardCheckpointer writes (zarr v2), which the job's chunk copies expect.
    context = v1.Context()
    context.atomicity.mode = options.AtomicityMode.ATOMIC_RENAME
    context.array.saving.use_zarr3 = False
    step_dir = f'{path}/1'
    with context:
      for first in range(0, params, per_save):
        kernels, mu, nu = {}, {}, {}
        for i in range(first, min(params, first + per_save)):
          grad = rng.standard_normal((rows, 1024), np.float32)
          kernels[f'layer_{i:05d}'] = {'kernel': put(rng.standard_normal((rows, 1024), np.float32))}
          mu[f'layer_{i:05d}'] = {'kernel': put(0.1 * grad)}
          nu[f'layer_{i:05d}'] = {'kernel': put(0.001 * grad * grad)}
        part = {'params': kernels, 'opt_state': [{'mu': mu, 'nu': nu}, None]}
        if first == 0:
          part['step'] = np.asarray(1, np.int32)
          part['opt_state'][0]['count'] = np.asarray(1, np.int32)
        partial.save(step_dir, part)
      partial.finalize(step_dir)
    # The step as CheckpointManager lays it out: partial saves name their item 'state'.
    os.rename(f'{step_dir}/state', f'{step_dir}/default')
    with open(f'{step_dir}/{CHECKPOINT_METADATA}') as f:
      metadata = json.load(f)
    metadata['item_handlers'] = {'default': STANDARD_HANDLER}
    with open(f'{step_dir}/{CHECKPOINT_METADATA}', 'w') as f:
      json.dump(metadata, f)
''')

TABLES = ('tiny', 'leaves', 'size', 'processes, tiny', 'processes')
LEAF_ROWS = 16384  # (16384, 1024) float32: 64 MiB a param.


def build(path: Path, gib: float, leaves: int | None = None) -> dict:
  """A checkpoint of about `gib` GiB (in about `leaves` leaves, else in params of 64 MiB): its
  bytes and leaves, and the builder's wall time and peak RSS."""
  params = max(1, round(leaves / 3) if leaves else round(gib * GIB / 3 / (LEAF_ROWS * 4096)))
  rows = max(8, int(gib * GIB / 3 / params / 4096) // 8 * 8)
  wall, rss = measure([sys.executable, '-c', BUILD, str(path), str(params), str(rows)])
  return {'bytes': 3 * params * rows * 4096, 'leaves': 3 * params + 2, 'build_wall': wall,
          'build_rss': rss}


def timed(table: str, commands: dict[str, list[str]], out: Path, runs: int, built: dict,
          env: dict[str, str] | None = None, processes: int = 1) -> list[dict]:
  """The median of `runs` of each command, interleaved, as rows of `table` with the checkpoint's
  figures."""
  rows = median_runs(commands, out, runs, env)
  return [{**row, **built, 'table': table, 'run': name, 'processes': processes}
          for name, row in rows.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/surgery_scaling')
  parser.add_argument('--gib', default='1,2,4,8')
  parser.add_argument('--budget_gb', type=float, default=0.5)
  parser.add_argument('--naive_max_gib', type=float, default=2.0)
  parser.add_argument('--processes', default='1,2,4')
  parser.add_argument('--processes_gib', type=float, default=2.0)
  parser.add_argument('--leaves', type=int, default=1000)
  parser.add_argument('--leaves_gib', type=float, default=0.25)
  parser.add_argument('--runs', type=int, default=1)
  parser.add_argument('--predict_tb', type=float, default=1.0)
  parser.add_argument('--predict_hosts', type=int, default=64)
  parser.add_argument('--predict_leaves', type=int, default=2200)
  parser.add_argument('--host_gbps', default='0.3,1', help='storage bandwidth per host, GB/s')
  args = parser.parse_args()
  root = Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  scripts = write_scripts(root)
  out = root / 'out'
  budget = [f'--config.memory.host_budget_gb={args.budget_gb}']

  def jobs(source: Path) -> dict[str, list[str]]:
    return {'(b) job, rename': [*job(scripts['rename'], source, out), *budget],
            '(c0) job, params only': [*job(scripts['params_only'], source, out), *budget]}

  rows = []
  tiny = root / 'tiny'
  tiny_built = build(tiny, 0.001, 30)
  rows += timed('tiny', jobs(tiny), out, args.runs, tiny_built)
  many = root / 'many'
  rows += timed('leaves', jobs(many), out, args.runs, build(many, args.leaves_gib, args.leaves))
  shutil.rmtree(many)
  sizes = [float(g) for g in args.gib.split(',') if g]
  for gib in sizes:
    source = root / f'in_{gib:g}'
    try:  # Gigabytes: gone even when a run fails.
      built = build(source, gib)
      print(f'{gib:g} GiB: built in {built["build_wall"]:.0f} s, peak RSS {built["build_rss"]:.2f} GiB; '
            f'{disk_mib(source):.0f} MiB on disk, {built["leaves"]} leaves; load average {load_average()}',
            flush=True)
      commands = {**jobs(source), '(d) cp -r + sync': copy_and_sync(source, out)}
      if gib <= args.naive_max_gib:
        commands['(a) naive rename'] = [sys.executable, scripts['naive'], str(source), str(out)]
      rows += timed('size', commands, out, args.runs, built)
      if gib == args.processes_gib:
        for n in (int(n) for n in args.processes.split(',') if n):
          env = {'SURGERY_JOB': f'{sys.executable} -m surgery_job', 'LOG_DIR': str(root / 'logs'),
                 'DEVICES_PER_PROCESS': str(8 // n)}
          for table, checkpoint, figures in (('processes, tiny', tiny, tiny_built),
                                             ('processes', source, built)):
            rows += timed(table, {name: launch(n, command) for name, command in jobs(checkpoint).items()},
                          out, args.runs, figures, env, n)
    finally:
      shutil.rmtree(source, ignore_errors=True)
  shutil.rmtree(tiny)

  bound = 1.5 * args.budget_gb * 1e9 / GIB + max(row['rss'] for row in rows if row['table'] == 'tiny')
  print(f'\nbudget {args.budget_gb} GB; peak RSS bound 1.5 x budget + the tiny run\'s RSS = '
        f'{bound:.2f} GiB; median of {args.runs}\n')
  print('| table | run | GiB | leaves | processes | wall s | s/GiB | MB/s | peak RSS GiB | within bound '
        '| groups |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for row in sorted(rows, key=lambda row: TABLES.index(row['table'])):
    within = '-' if not row['run'].startswith(('(b)', '(c0)')) else 'yes' if row['rss'] <= bound else 'NO'
    print(f"| {row['table']} | {row['run']} | {row['bytes'] / GIB:.2f} | {row['leaves']} | {row['processes']} | "
          f"{row['wall']:.1f} | {row['wall'] / (row['bytes'] / GIB):.1f} | "
          f"{row['bytes'] / 1e6 / row['wall']:.0f} | {row['rss']:.2f} | {within} | {row['groups'] or '-'} |")
  for name in ('(b) job, rename', '(c0) job, params only', '(d) cp -r + sync'):
    per_gib = [row['wall'] / (row['bytes'] / GIB) for row in rows
               if row['run'] == name and row['table'] == 'size']
    print(f'{name}: s/GiB from {min(sizes):g} to {max(sizes):g} GiB: '
          f'{" ".join(f"{x:.1f}" for x in per_gib)}, largest / smallest {max(per_gib) / min(per_gib):.2f}')
  for name in ('(b) job, rename', '(c0) job, params only'):
    model(name, [row for row in rows if row['run'] == name], args)
  params = args.predict_tb * 1e12 / 12
  print(f"\nMaxText's single-host converter at about 2 GB of host memory per billion params: "
        f'{args.predict_tb:g} TB of float32 params and two Adam moments (12 bytes a param) is '
        f'{params / 1e9:.0f} B params, about {2 * params / 1e9:.0f} GB on one host.')


def launch(processes: int, command: list[str]) -> list[str]:
  """`command` (the job's, as `job` gives it) on `processes` processes through launch/local.sh,
  which runs $SURGERY_JOB with the arguments."""
  return ['bash', str(REPO / 'launch' / 'local.sh'), str(processes), '--', *command[3:]]


def model(name: str, rows: list[dict], args) -> None:
  """Fits time = start-up + bytes x s/byte + leaves x s/leaf to the one-process `rows` (least
  squares), prints every row against it, and the prediction for `args.predict_tb` TB. Rows through
  launch/local.sh take the start-up of the tiny checkpoint on as many processes."""
  single = [row for row in rows if not row['table'].startswith('processes')]
  features = np.array([[1.0, row['bytes'], row['leaves']] for row in single])
  (startup, per_byte, per_leaf), *_ = np.linalg.lstsq(
      features, np.array([row['wall'] for row in single]), rcond=None)
  per_process = 1 / per_byte
  # On N processes the start-up is the one-process fit's plus what the tiny checkpoint took more.
  startups = {row['processes']: row['wall'] - row['bytes'] * per_byte - row['leaves'] * per_leaf
              for row in rows if row['table'] == 'processes, tiny'}

  def start(row: dict) -> float:
    return startups[row['processes']] if row['table'].startswith('processes') else startup

  # What N processes moved together at best: the bytes over the time the model leaves for them
  # (none where the noise leaves no time at all).
  moving = [row['wall'] - start(row) - row['leaves'] * per_leaf for row in rows]
  aggregate = max([row['bytes'] / seconds for row, seconds in zip(rows, moving)
                   if row['table'] == 'processes' and seconds > 0] or [per_process])

  def predicted(row: dict) -> float:
    bandwidth = min(row['processes'] * per_process, aggregate)
    return start(row) + row['bytes'] / bandwidth + row['leaves'] * per_leaf

  errors = [predicted(row) / row['wall'] - 1 for row in rows]
  print(f'\n{name}: time = start-up ({startup:.2f} s; on N processes through local.sh: '
        f'{", ".join(f"{n}: {t:.1f} s" for n, t in startups.items())}) + bytes / min(N x {per_process / 1e6:.0f} MB/s, '
        f'{aggregate / 1e6:.0f} MB/s) + leaves x {per_leaf * 1e3:.2f} ms '
        f'(least squares over {len(single)} one-process rows)\n')
  print('| table | GiB | leaves | processes | measured s | model s | error |')
  print('|---|---|---|---|---|---|---|')
  for row, error in zip(rows, errors):
    print(f"| {row['table']} | {row['bytes'] / GIB:.2f} | {row['leaves']} | {row['processes']} | {row['wall']:.1f} | "
          f'{predicted(row):.1f} | {error:+.0%} |')
  print(f'largest error {max(abs(e) for e in errors):.0%}')
  total = args.predict_tb * 1e12
  per_host = total / args.predict_hosts
  # The start-up measured on the most processes here stands for the hosts' (one process each).
  host_startup = max([startup, *startups.values()])
  print(f'\n{args.predict_tb:g} TB in {args.predict_leaves} leaves on {args.predict_hosts} hosts '
        f'({per_host / 1e9:.1f} GB each; start-up {host_startup:.1f} s; memory per host: the budget, '
        f'{args.budget_gb} GB, plus the fixed cost):\n')
  print('| per host | bandwidth MB/s | predicted s |')
  print('|---|---|---|')
  bandwidths = [(f'storage at {gbps} GB/s', float(gbps) * 1e9) for gbps in args.host_gbps.split(',') if gbps]
  bandwidths.append(('one process of this machine', per_process))
  for what, bandwidth in bandwidths:
    print(f'| {what} | {bandwidth / 1e6:.0f} | '
          f'{host_startup + per_host / bandwidth + args.predict_leaves * per_leaf:.0f} |')


if __name__ == '__main__':
  start = time.perf_counter()
  print(f'commit {commit()}, load average {load_average()}', flush=True)
  main()
  print(f'\n(benchmark took {time.perf_counter() - start:.0f} s; load average {load_average()} at the end)')
