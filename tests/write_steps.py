"""A trainer stand-in: saves the layered checkpoint at each given step into a CheckpointManager
directory with plain Orbax, a pause between steps, then leaves one step in progress on purpose
(the temporary folder Orbax writes before its commit rename).

  python tests/write_steps.py PATH PAUSE_SECONDS STEP... IN_PROGRESS_STEP
"""

import os
import shutil
import sys
import time

import checkpoints


def state_at(step: int) -> dict:
  return checkpoints.train_state(checkpoints.layered_params(seed=step), step=step)


def main(path: str, pause: float, steps: list[int], in_progress: int) -> None:
  mesh = checkpoints.mesh_2x4()
  for step in steps:
    checkpoints.save_manager(path, checkpoints.shard(state_at(step), mesh), step=step)
    time.sleep(pause)
  # A save caught in the middle: Orbax's temporary folder, with a complete-looking item inside.
  shutil.copytree(os.path.join(path, str(steps[-1])),
                  os.path.join(path, f'{in_progress}.orbax-checkpoint-tmp-1234'))


if __name__ == '__main__':
  main(sys.argv[1], float(sys.argv[2]), [int(s) for s in sys.argv[3:-1]], int(sys.argv[-1]))
