"""Eight fake CPU devices for the test process; one JAX compilation cache for the session; fixtures
with real Orbax checkpoints; a local GCS."""

import atexit
import os
import re
import shutil
import signal
import tempfile

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
# The hundreds of job processes the tests start compile the same small programs: most of a run's
# time here. They share one persistent compilation cache (inherited through the environment), new
# for each session, so every session also compiles each program once; even the smallest programs go
# in. It keys on the program and the devices: outputs are the same bits.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix='surgery_job_tests_jax_cache_')
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
# A suite started in the background of a script inherits SIGINT ignored, and so would every job it
# starts (the job keeps an ignored SIGINT ignored, as under nohup): the Ctrl-C tests need it to arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)

import sys  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position

import checkpoints  # pylint: disable=wrong-import-position
import gcs_emulator  # pylint: disable=wrong-import-position
from jobs import REPO, launch, ok, run_job, write_config  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def layered(tmp_path_factory):
  """A CheckpointManager dir (step 3) of the layered params with Adam state, on a 2x4 mesh."""
  path = tmp_path_factory.mktemp('layered') / 'ckpt'
  state = checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()),
                            checkpoints.mesh_2x4())
  checkpoints.save_manager(path, state, step=3)
  return path, checkpoints.flat_numpy(state)


@pytest.fixture(scope='session')
def two_process_checkpoint(tmp_path_factory):
  """The layered checkpoint written by 2 processes x 4 devices; its numpy values."""
  path = tmp_path_factory.mktemp('mp') / 'ckpt'
  ok(launch(2, str(path), log_dir=path.parent / 'logs',
            command=f'{sys.executable} {REPO / "tests" / "write_checkpoint.py"}'))
  assert {p.name for p in (path / '3' / 'default').glob('ocdbt.process_*')} == {'ocdbt.process_0', 'ocdbt.process_1'}
  return path, checkpoints.flat_numpy(checkpoints.train_state(checkpoints.layered_params()))


@pytest.fixture(scope='session')
def baseline(layered, tmp_path_factory):
  """The output of an uninterrupted run of test_safety.TRANSFORMS on `layered`, and the config file
  that made it."""
  from test_safety import TRANSFORMS, values  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp('baseline')
  config = write_config(directory, {'transforms': TRANSFORMS})
  ok(run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={directory / "out"}'))
  return config, values(directory / 'out')


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 for the session (`gcs_emulator.Emulator`: `bucket` is
  'gs://bucket', `env` what a job subprocess needs to use it). This process uses it too, through
  plain Orbax and epath; its environment is put back afterwards."""
  with gcs_emulator.running(tmp_path_factory.mktemp('gcs')) as emulator:
    saved = {name: os.environ.get(name) for name in emulator.env}
    gcs_emulator.use_in_this_process(emulator)
    yield emulator
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@pytest.fixture
def gs_path(gcs, request) -> epath.Path:
  """This test's own folder on the emulator: gs://bucket/<test module>/<test name>."""
  name = re.sub(r'[^\w.-]+', '_', request.node.name)
  return epath.Path(gcs.bucket) / request.module.__name__ / name
