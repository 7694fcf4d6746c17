"""Eight fake CPU devices for the test process; fixtures with real Orbax checkpoints."""

import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'

import pytest  # pylint: disable=wrong-import-position

import checkpoints  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def layered(tmp_path_factory):
  """A CheckpointManager dir (step 3) of the layered params with Adam state, on a 2x4 mesh."""
  path = tmp_path_factory.mktemp('layered') / 'ckpt'
  state = checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()),
                            checkpoints.mesh_2x4())
  checkpoints.save_manager(path, state, step=3)
  return path, checkpoints.flat_numpy(state)
