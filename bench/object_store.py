"""Wall time and read throughput of the job on gs:// next to local disk, and the requests it makes
there, on a local GCS emulator: an in-memory server on this machine, not GCS.

  .venv/bin/python bench/object_store.py [--dir=/tmp/surgery_object_store] [--mib=256] [--runs=3]
                                         [--leaves=3000]

Starts tests/gcs_emulator.py, builds bench/throughput.py's checkpoint (params and their optax Adam
state on a ('data', 'model') 2x4 mesh of 8 fake CPU devices) of `--mib` MiB once on local disk and
once on gs://, then times, interleaved, the median of `--runs` runs of the job renaming every param
(throughput.py's (b)) local -> local, gs -> gs, local -> gs and gs -> local, with the emulator's
request counts of each. A second table counts the requests of a dry run (the read phase and the
plan: metadata only) from that gs:// checkpoint and from ones of the same size cut into `--leaves`
leaves: object stores charge latency per request, so these should not grow with the leaves.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ENV, GIB, MIB, measure
from surgery_job import paths, report
from throughput import RENAME, build, job

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'tests'))
import gcs_emulator  # pylint: disable=wrong-import-position


def remove(path: paths.Path) -> None:
  if path.exists():
    path.rmtree()


def median_runs(commands: dict[str, tuple[list[str], paths.Path]], runs: int,
                emulator: gcs_emulator.Emulator) -> dict[str, dict]:
  """Each (command, its output) `runs` times, interleaved; the median wall time's run, with its
  phases and the requests the emulator served during it."""
  results = {name: [] for name in commands}
  for _ in range(runs):
    for name, (command, out) in commands.items():
      remove(out)
      subprocess.run(['sync'], check=True)
      emulator.request_counts(reset=True)
      wall, _ = measure(command)
      requests = emulator.request_counts()
      phases = json.loads(report.find(out).read_text())['seconds']
      results[name].append({'wall': wall, 'phases': phases, 'requests': requests})
  for _, out in commands.values():
    remove(out)
  return {name: sorted(rows, key=lambda r: r['wall'])[len(rows) // 2] for name, rows in results.items()}


def by_kind(requests: dict) -> str:
  kinds = sorted(requests['requests'].items(), key=lambda kv: -kv[1])
  batched = ''.join(f', {n} {method} in batches' for method, n in requests['batched'].items())
  return ', '.join(f'{kind} {n}' for kind, n in kinds) + batched


def dry_run(source: paths.Path, leaves: int, rename: Path, local: paths.Path,
            emulator: gcs_emulator.Emulator) -> None:
  """Prints the row of a dry run from `source`: its output path is local, so every request the
  emulator serves is a read of the input."""
  emulator.request_counts(reset=True)
  wall, _ = measure(job(str(rename), source, local / 'out') + ['--config.dry_run=True'])
  requests = emulator.request_counts()
  print(f"| {leaves} | {wall:.1f} | {requests['total']} | {requests['total'] / leaves:.2f} | "
        f'{by_kind(requests)} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/surgery_object_store')
  parser.add_argument('--mib', type=float, default=256)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--leaves', default='3000')
  args = parser.parse_args()
  root = Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  rename = root / 'rename.py'
  rename.write_text(RENAME)
  with gcs_emulator.running(root) as emulator:
    # Every command gets the emulator's environment (it changes nothing on local paths), and this
    # process reaches it too, to clear outputs and read reports.
    ENV.update(emulator.env)
    gcs_emulator.use_in_this_process(emulator)
    local, gs = paths.of(root), paths.of(emulator.bucket)
    leaves, size = build(local / 'in', args.mib * MIB / GIB, 30)
    build(gs / 'in', args.mib * MIB / GIB, 30)
    print(f'checkpoint: {leaves} leaves, {size / MIB:.0f} MiB (params and Adam state), 2x4 mesh\n'
          f'EMULATOR FIGURES: gcp-storage-emulator in memory on 127.0.0.1, sharing this machine\'s '
          f'{os.cpu_count()} cores with the job; not GCS.')
    places = {'local': local, 'gs': gs}
    commands = {f'{a} -> {b}': (job(str(rename), places[a] / 'in', places[b] / 'out'), places[b] / 'out')
                for a, b in (('local', 'local'), ('gs', 'gs'), ('local', 'gs'), ('gs', 'local'))}
    rows = median_runs(commands, args.runs, emulator)
    print(f'\njob, rename: median of {args.runs}, interleaved (emulator figures)\n')
    # The report is written before the commit, so its phases leave out the commit (on gs:// a copy
    # of every object into place) as well as the process's start and end.
    print('| run | wall s | read MB/s | phases (s) | not in phases s | emulator requests |')
    print('|---|---|---|---|---|---|')
    for name, row in rows.items():
      phases = ', '.join(f'{k} {v:.1f}' for k, v in row['phases'].items() if v >= 0.05)
      print(f"| {name} | {row['wall']:.1f} | {size / 1e6 / row['wall']:.0f} | {phases} | "
            f"{row['wall'] - sum(row['phases'].values()):.1f} | "
            f"{row['requests']['total']}: {by_kind(row['requests']) or '-'} |")

    print('\ndry run (read phase and plan: metadata only) from gs://, same size (emulator figures)\n')
    print('| leaves | wall s | emulator requests | per leaf | by kind |')
    print('|---|---|---|---|---|')
    dry_run(gs / 'in', leaves, rename, local, emulator)
    for count in (int(n) for n in args.leaves.split(',') if n):
      source = gs / f'in_{count}'
      dry_run(source, build(source, args.mib * MIB / GIB, count)[0], rename, local, emulator)
      remove(source)


if __name__ == '__main__':
  start = time.perf_counter()
  main()
  print(f'\n(benchmark took {time.perf_counter() - start:.0f} s)')
