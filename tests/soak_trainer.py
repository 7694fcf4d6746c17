"""A trainer for the soak test: saves steps with a plain Orbax CheckpointManager and its own
max_to_keep, so steps appear and vanish, as its commands on stdin say:

  save STEP VERSION   saves the layered train state of that step (`state_at`); a step not above
                      the latest one is a roll-back: the steps from it on are deleted first, as a
                      trainer restarted from an earlier checkpoint does, and saved again with
                      other values (another VERSION)

After each save it appends the step, its version and the sha256 of each of its files to RECORD (a
JSON line), then answers `done STEP` on stdout.

  python tests/soak_trainer.py PATH RECORD MAX_TO_KEEP
"""

import hashlib
import json
import sys
from pathlib import Path

import orbax.checkpoint as ocp

import checkpoints


def state_at(step: int, version: int) -> dict:
  """Version 0 is `write_steps.state_at(step)`."""
  return checkpoints.train_state(checkpoints.layered_params(seed=step + 1000 * version), step=step)


def file_hashes(step_dir: Path) -> dict[str, str]:
  return {str(f.relative_to(step_dir)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(step_dir.rglob('*')) if f.is_file()}


def main(path: Path, record: Path, max_to_keep: int) -> None:
  mesh = checkpoints.mesh_2x4()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  with ocp.CheckpointManager(path, options=options) as manager:
    for line in sys.stdin:
      _, step, version = line.split()
      step, version = int(step), int(version)
      for newer in [s for s in manager.all_steps() if s >= step]:
        manager.delete(newer)
      manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(
          checkpoints.shard(state_at(step, version), mesh))))
      manager.wait_until_finished()
      with record.open('a') as f:
        f.write(json.dumps({'step': step, 'version': version,
                            'files': file_hashes(path / str(step))}) + '\n')
      print('done', step, flush=True)


if __name__ == '__main__':
  main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
