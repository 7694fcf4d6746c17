"""`surgery_report.json`: what a run read, did and wrote, kept beside the checkpoint it describes.

`python -m surgery_job.report OUTPUT_PATH` prints a short summary of one.
"""

import json
import sys
from pathlib import Path

REPORT = 'surgery_report.json'


def build(config, plan, groups, source, out_root: Path, out_step, seconds: dict[str, float],
          fingerprint: str) -> dict:
  return {
      'fingerprint': fingerprint,
      'input': {'path': str(source.root), 'step': source.step, 'item': source.item},
      'output': {'path': str(out_root), 'step': out_step},
      'config': config.to_dict(),
      'mesh': dict(plan.mesh.shape),
      'ops': [{'op': label, 'touched': keys} for label, keys in plan.touched],
      'leaves': {k: {'shape': list(leaf.shape), 'dtype': leaf.dtype.name, 'spec': list(leaf.spec),
                     'sources': list(leaf.sources)} for k, leaf in plan.outputs.items()},
      'groups': [{'outputs': list(g.outputs), 'inputs': list(g.inputs), 'host_bytes': g.host_bytes}
                 for g in groups],
      'predicted_peak_host_bytes': max(g.host_bytes for g in groups),
      'bytes_read': plan.bytes_read,
      'bytes_written': plan.bytes_written,
      'seconds': dict(seconds),
      'validation': {'ok': True, 'leaves_compared': len(plan.outputs)},
  }


def write(report: dict, directory: Path) -> None:
  (directory / REPORT).write_text(json.dumps(report, indent=2, default=str))


def summary(report: dict) -> str:
  lines = [f"{report['input']['path']} (step {report['input']['step']}) -> "
           f"{report['output']['path']} (step {report['output']['step']}) on mesh {report['mesh']}"]
  lines += [f"  {op['op']}: {len(op['touched'])} keys touched" for op in report['ops']]
  lines.append(f"  {len(report['leaves'])} leaves written in {len(report['groups'])} groups, {report['bytes_read']} bytes read, "
               f"{report['bytes_written']} bytes written, validated: {report['validation']['ok']}")
  lines.append('  seconds: ' + ', '.join(f'{k} {v:.2f}' for k, v in report['seconds'].items()))
  return '\n'.join(lines)


if __name__ == '__main__':
  print(summary(json.loads((Path(sys.argv[1]) / REPORT).read_text())))
