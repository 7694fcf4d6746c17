"""`surgery_report.json`: what a run read, did and wrote, kept beside the checkpoint it describes.

`surgery-job-report PATH` (or `python -m surgery_job.report`) prints a short summary of one: PATH
is a single PyTree output, an output step folder, or a CheckpointManager output (its latest step
with a report).
"""

import json
import sys

from surgery_job import paths, plan as plan_lib
from surgery_job.errors import SurgeryError

PROG = 'surgery-job-report'
REPORT = 'surgery_report.json'


def build(config, plan, groups, source, target, seconds: dict[str, float], fingerprint: str,
          reused: list[int], cast_errors: dict, copied: list[str], read_ahead: list[int]) -> dict:
  """The report of a run; `reused`: the groups an earlier, stopped run of it had written;
  `cast_errors`: what each cast lost, in the groups this run computed; `copied`: the leaves
  copied as stored chunks (in no group); `read_ahead`: the groups read while the one before them
  was written."""
  return {
      'fingerprint': fingerprint,
      'input': {'path': str(source.root), 'step': source.step, 'item': source.item},
      'output': {'path': str(target.root), 'step': target.step},
      'config': config.to_dict(),
      'mesh': dict(plan.mesh.shape),
      'ops': [{'op': label, 'touched': keys} for label, keys in plan.touched],
      'leaves': {k: {'shape': list(leaf.shape), 'dtype': leaf.dtype.name, 'spec': list(leaf.spec),
                     'sources': list(leaf.sources)} for k, leaf in plan.outputs.items()},
      'groups': [{'outputs': list(g.outputs), 'inputs': list(g.inputs), 'host_bytes': g.host_bytes,
                  'temp_bytes': g.temp_bytes} for g in groups],
      'groups_read_ahead': read_ahead,
      'predicted_peak_host_bytes': plan_lib.peak_bytes(groups, read_ahead),
      'bytes_read': plan.bytes_read,
      'groups_reused': reused,
      'copied_as_stored_chunks': copied,
      'cast_errors': cast_errors,
      'bytes_read_this_run': sum(plan.inputs_bytes(g.inputs) for i, g in enumerate(groups)
                                 if i not in reused),
      'bytes_written': plan.bytes_written,
      'seconds': dict(seconds),
      'validation': {'ok': True, 'leaves_compared': len(plan.outputs)},
      # What model family ops found, and the config.json that goes with the output's tensors.
      'model': {'notes': list(plan.notes), 'config_json': plan.model_config},
  }


def write(report: dict, directory: paths.Path) -> None:
  (directory / REPORT).write_text(json.dumps(report, indent=2, default=str))


def summary(report: dict) -> str:
  lines = [f"{report['input']['path']} (step {report['input']['step']}) -> "
           f"{report['output']['path']} (step {report['output']['step']}) on mesh {report['mesh']}"]
  lines += [f"  {op['op']}: {len(op['touched'])} keys touched" for op in report['ops']]
  lines += [f'  {note}' for note in (report.get('model') or {}).get('notes', [])]
  lines.append(f"  {len(report['leaves'])} leaves written in {len(report['groups'])} groups, {report['bytes_read']} bytes read, "
               f"{report['bytes_written']} bytes written, validated: {report['validation']['ok']}")
  casts = report.get('cast_errors') or {}
  if casts:
    lines.append(f'  cast {cast_summary(casts)}')
  lines.append('  seconds: ' + ', '.join(f'{k} {v:.2f}' for k, v in report['seconds'].items()))
  return '\n'.join(lines)


def cast_summary(casts: dict[str, dict]) -> str:
  """Every cast of a run in one line: how many leaves, the worst relative error and where, the
  counts of values that overflowed or were flushed to zero."""
  worst = max(casts, key=lambda k: casts[k]['max_rel_error'])
  return (f"{len(casts)} leaves: worst max rel error {casts[worst]['max_rel_error']:.3g} ({worst}), "
          f"{sum(c['overflowed'] for c in casts.values())} values overflowed, "
          f"{sum(c['flushed_to_zero'] for c in casts.values())} flushed to zero")


def find(path: paths.Path) -> paths.Path:
  """The report of `path`, or of the latest step under it that has one."""
  if (path / REPORT).is_file():
    return path / REPORT
  if not path.is_dir():
    raise SurgeryError(f'{path} does not exist' if not path.exists() else f'{path} is not a folder')
  steps = sorted((int(p.name), p) for p in path.iterdir() if p.name.isascii() and p.name.isdigit()
                 and (p / REPORT).is_file())
  if not steps:
    raise SurgeryError(f'no {REPORT} in {path} or its step folders')
  return steps[-1][1] / REPORT


def main(argv: list[str]) -> int:
  from surgery_job import cli  # pylint: disable=import-outside-toplevel  (cli reads checkpoints)
  parser = cli.Parser(prog=PROG, description='Summarizes the surgery_report.json of a surgery output.')
  parser.add_argument('path', help='a single PyTree output, an output step folder, or a '
                      'CheckpointManager output (its latest step with a report)')
  parser.add_argument('--json', action='store_true', help='print the whole report as JSON')
  args = parser.parse_args(argv)
  found = find(paths.of(args.path))
  try:
    report = json.loads(found.read_text())
  except ValueError as e:
    raise SurgeryError(f'{found} is not a report: {e}') from None
  print(json.dumps(report, indent=2) if args.json else summary(report))
  return 0


def run() -> None:
  """The console script."""
  from surgery_job import cli  # pylint: disable=import-outside-toplevel
  sys.exit(cli.run(PROG, main))


if __name__ == '__main__':
  run()
