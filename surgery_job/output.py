"""How the output becomes visible: complete and validated, or not at all.

The job writes into `OUT.surgery-tmp/checkpoint`, beside `output.path`. The staging folder holds a
marker file, so that a later run removes only what a run of this job made. After validation, one
atomic rename moves `checkpoint` to `output.path`. An older output being replaced waits inside the
staging folder until that rename, and is put back if the run dies between the two renames.
"""

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from surgery_job import faults
from surgery_job.errors import SurgeryError
from surgery_job.report import REPORT

MARKER = 'SURGERY_JOB_STAGING'
SUFFIX = '.surgery-tmp'


def fingerprint(config, input_location) -> str:
  """What makes two runs the same surgery: the resolved input and the config, less where the output
  goes and the memory budget (the output is the same bits whatever the budget)."""
  fields = config.to_dict()
  fields.pop('memory', None)
  fields['input'] = {'path': str(input_location.root), 'step': input_location.step,
                     'item': input_location.item}
  fields['output'] = {k: v for k, v in fields['output'].items() if k not in ('path', 'overwrite')}
  fields.pop('dry_run', None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def existing_fingerprint(out_root: Path) -> str | None:
  """The fingerprint in the report of the output already at `out_root`, if it has one."""
  try:
    return json.loads((out_root / REPORT).read_text()).get('fingerprint')
  except (OSError, ValueError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class Staging:
  out_root: Path

  @property
  def root(self) -> Path:
    return self.out_root.with_name(self.out_root.name + SUFFIX)

  @property
  def checkpoint(self) -> Path:
    """Where Orbax writes the output."""
    return self.root / 'checkpoint'

  @property
  def displaced(self) -> Path:
    return self.root / 'replaced'

  def clean(self) -> None:
    """Removes what an interrupted run left, putting back an output it had moved aside."""
    if not self.root.exists():
      return
    if not (self.root / MARKER).is_file():
      raise SurgeryError(f'{self.root} exists but was not made by surgery_job; remove it or '
                         'choose another output.path')
    if self.displaced.exists() and not self.out_root.exists():
      self.displaced.rename(self.out_root)
    shutil.rmtree(self.root)

  def create(self, run_fingerprint: str) -> None:
    self.clean()
    self.root.mkdir(parents=True)
    (self.root / MARKER).write_text(json.dumps({'fingerprint': run_fingerprint, 'created': time.time()}))

  def commit(self) -> None:
    """Renames the validated checkpoint to `output.path`; an older output goes only now."""
    if self.out_root.exists():
      self.out_root.rename(self.displaced)
    faults.at('rename')
    self.checkpoint.rename(self.out_root)
    shutil.rmtree(self.root)
