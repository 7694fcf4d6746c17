"""The GCS emulator as the job will use it: plain Orbax, epath and tensorstore on gs:// paths."""

import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

import checkpoints
from jobs import REPO, job_env, ok


def test_checkpoint_manager_saves_and_restores_a_sharded_tree(gs_path, gcs, tmp_path):
  state = checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()),
                            checkpoints.mesh_2x4())
  checkpoints.save_manager(gs_path, state, step=3)
  assert checkpoints.visible_steps(gs_path) == [3]
  restored = checkpoints.restore_plain(gs_path / '3' / 'default')
  expected, got = checkpoints.flat_numpy(state), checkpoints.flat_numpy(restored)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  # A separate process, as the job is, reaches the emulator with `gcs.env`.
  npz = tmp_path / 'restored.npz'
  ok(subprocess.run([sys.executable, str(REPO / 'tests' / 'restore_on_mesh.py'),
                     str(gs_path / '3' / 'default'), str(npz), '1', '4'],
                    env=job_env(4, gcs.env), capture_output=True, text=True, timeout=120))
  with np.load(npz) as other:
    assert {key: other[key].tolist() for key in other} == {
        key: value.tolist() for key, value in expected.items()}


def test_a_step_without_its_commit_file_is_not_listed(gs_path):
  # On gs:// Orbax writes in place and puts commit_success.txt down last: no file, no step.
  with ocp.CheckpointManager(gs_path) as manager:
    for step in (1, 2):
      manager.save(step, args=ocp.args.Composite(
          default=ocp.args.StandardSave({'x': np.arange(4, dtype=np.float32)})))
    manager.wait_until_finished()
  (gs_path / '2' / 'commit_success.txt').unlink()
  assert checkpoints.visible_steps(gs_path) == [1]


def test_epath_writes_lists_reads_and_renames_a_file(gs_path):
  (gs_path / 'a').mkdir(parents=True, exist_ok=True)
  (gs_path / 'a' / 'notes.txt').write_text('first')
  (gs_path / 'top.json').write_bytes(b'{}')
  assert sorted(p.name for p in gs_path.iterdir()) == ['a', 'top.json']
  assert (gs_path / 'a').is_dir() and (gs_path / 'top.json').is_file()
  (gs_path / 'a' / 'notes.txt').rename(gs_path / 'a' / 'done.txt')
  assert [p.name for p in (gs_path / 'a').iterdir()] == ['done.txt']
  assert (gs_path / 'a' / 'done.txt').read_text() == 'first'


def test_tensorstore_conditional_writes_create_once_and_swap_only_what_was_read(gs_path):
  # The generation preconditions that a lock on gs:// stands on.
  bucket, path = str(gs_path).removeprefix('gs://').split('/', 1)
  store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket, 'path': f'{path}/'}).result()
  absent = store.read('lock').result().stamp.generation
  held = store.write('lock', b'a', if_equal=absent).result().generation
  assert held
  assert not store.write('lock', b'b', if_equal=absent).result().generation  # Not created twice.
  renewed = store.write('lock', b'a again', if_equal=held).result().generation
  assert not store.write('lock', b'b', if_equal=held).result().generation  # Stale: not swapped.
  read = store.read('lock').result()
  assert (read.value, read.stamp.generation) == (b'a again', renewed)


def test_this_process_lists_what_tensorstore_wrote_after_a_listing(gs_path):
  (gs_path / 'a').write_text('a')
  assert [p.name for p in gs_path.iterdir()] == ['a']
  bucket, path = str(gs_path).removeprefix('gs://').split('/', 1)
  store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket, 'path': f'{path}/'}).result()
  store.write('b', b'b').result()
  assert sorted(p.name for p in gs_path.iterdir()) == ['a', 'b']
  assert (gs_path / 'b').exists()


def test_the_emulator_counts_the_requests_it_serves_by_kind(gs_path, gcs):
  gcs.request_counts(reset=True)
  (gs_path / 'a').write_text('a')
  assert (gs_path / 'a').read_text() == 'a'
  assert [p.name for p in gs_path.iterdir()] == ['a']
  counts = gcs.request_counts(reset=True)
  assert counts['total'] == sum(counts['requests'].values())
  assert {'POST upload', 'GET read', 'GET list'} <= set(counts['requests']), counts
  assert gcs.request_counts()['total'] == 0


def test_print_env_gives_the_exports_that_point_the_tools_at_it(tmp_path):
  """The README's gs:// on a laptop: one command serves a bucket and prints what to export."""
  server = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), '--print-env'],
                            stdout=subprocess.PIPE, text=True)
  try:
    lines = [server.stdout.readline()]
    while lines[-1].startswith('export '):
      lines.append(server.stdout.readline())
    assert lines[-1].startswith('# gs://bucket is served at http://127.0.0.1:'), lines
    exports = dict(line.removeprefix('export ').strip().split('=', 1) for line in lines[:-1])
    found = subprocess.run([str(REPO / '.venv' / 'bin' / 'surgery-job-inspect'), 'gs://bucket/run'],
                           env={**job_env(), **exports}, capture_output=True, text=True, timeout=120,
                           check=False)
    assert (found.returncode, found.stderr.strip()) == (
        2, 'surgery-job-inspect: error: gs://bucket/run does not exist')
  finally:
    server.terminate()
    server.wait(timeout=10)
