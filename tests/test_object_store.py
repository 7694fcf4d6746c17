"""gs:// input and output on a local GCS emulator: the same surgery as on a local disk, read back
with plain Orbax, and the output protocol's promises where there is no rename."""

import json
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import PartitionSpec as P

import checkpoints
from jobs import REPO, job_env, launch, ok, run_job, write_config
from surgery_job import checkpoint
from surgery_job.errors import SurgeryError
from surgery_job.output import DELETING_MARKER, RECORD
from test_bad_input import assert_bad_input
from test_ops import SPLIT, STACK, bf16
from test_safety import start_paused
from test_scheduled import SERVING, expected, trained  # noqa: F401  (trained: a fixture)

COMMIT_FILE = 'commit_success.txt'
STAGING = '3.orbax-checkpoint-tmp-surgery'

# One op of every family, chained: split and fuse QKV, scan, pad, cast with the moments, rename,
# copy, add, transpose, scale, map, reset the moments, drop, set the step.
EVERY_FAMILY = [
    SPLIT,
    dict(op='concat', sources=[r'layers_(\d+)/attn/q/kernel', r'layers_(\d+)/attn/k/kernel',
                               r'layers_(\d+)/attn/v/kernel'], axis=1, target=r'layers_\1/attn/qkv/kernel'),
    STACK,
    dict(op='pad', pattern='embed/embedding', axis=0, size=20, init='normal'),
    dict(op='cast', pattern='head/kernel', dtype='bfloat16', optimizer=True),
    dict(op='rename', pattern='head/(.*)', replacement=r'lm_head/\1'),
    dict(op='copy', source='lm_head/bias', target='extra/bias'),
    dict(op='add', path='extra/kernel', shape=[8, 4], init='normal'),
    dict(op='transpose', pattern='lm_head/kernel', axes=[1, 0]),
    dict(op='scale', pattern='extra/bias', factor=0.5),
    dict(op='map', pattern='lm_head/bias', fn='jax.numpy:negative'),
    dict(op='reset_optimizer', pattern='embed/.*'),
    dict(op='drop', pattern='layers/mlp/bias'),
    dict(op='set_step', value=100),
]


@pytest.fixture(scope='module')
def gs_input(gcs, layered):
  """The layered CheckpointManager checkpoint (step 3), saved to the emulator by plain Orbax."""
  path = epath.Path(gcs.bucket) / 'inputs' / 'layered'
  checkpoints.save_manager(path, sharded_state(), step=3)
  return path, layered[1]


def sharded_state() -> dict:
  return checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()),
                           checkpoints.mesh_2x4())


@pytest.fixture(scope='module')
def every_family_on_disk(layered, tmp_path_factory):
  """EVERY_FAMILY run on the local disk: what the same run on gs:// must write, bit for bit."""
  directory = tmp_path_factory.mktemp('every_family')
  config = write_config(directory, {'transforms': EVERY_FAMILY})
  ok(run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={directory / "out"}'))
  item = directory / 'out' / '3' / 'default'
  return config, checkpoints.flat_numpy(checkpoints.restore_plain(item)), checkpoints.saved_specs(item)


def assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def read(item_dir) -> dict:
  return checkpoints.flat_numpy(checkpoints.restore_plain(item_dir))


def test_every_op_family_on_gs_equals_the_local_disk(gs_input, every_family_on_disk, gs_path, gcs):
  config, want, want_specs = every_family_on_disk
  in_path, x = gs_input
  out = gs_path / 'out'
  result = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
                   env=gcs.env)
  ok(result)
  # Quiet: gcsfs's file reads (fsspec's read-ahead caches) log nothing at the default verbosity.
  assert 'Readahead' not in result.stderr and 'caching.py' not in result.stderr
  assert checkpoints.visible_steps(out) == [3]
  got = read(out / '3' / 'default')
  assert_same(got, want)
  assert checkpoints.saved_specs(out / '3' / 'default') == want_specs
  # The chain did what it says, read from gs://.
  np.testing.assert_array_equal(got['params/lm_head/kernel'], bf16(x['params/head/kernel']).T)
  np.testing.assert_array_equal(got['params/lm_head/bias'], -x['params/head/bias'])
  assert got['params/layers/mlp/kernel'].shape == (3, 8, 16) and int(got['step']) == 100
  assert want_specs['params/layers/mlp/kernel'] == P(None, 'data', 'model')
  # Orbax's marker of a finished save on an object store, in the step and in its item; no
  # staging folder, no lock, no folder placeholders left behind.
  assert (out / '3' / COMMIT_FILE).exists() and (out / '3' / 'default' / COMMIT_FILE).exists()
  assert sorted(p.name for p in out.iterdir()) == ['3', RECORD]
  report = json.loads((out / '3' / 'surgery_report.json').read_text())
  assert report['validation']['ok'] and report['output']['path'] == str(out)
  # surgery-job-inspect reads it where it is.
  inspected = subprocess.run([sys.executable, '-m', 'surgery_job.inspect', str(out), '--json'],
                             env=job_env(env=gcs.env), capture_output=True, text=True, timeout=120)
  ok(inspected)
  assert set(json.loads(inspected.stdout)['leaves']) == set(want)
  # Again: already done, nothing rewritten.
  again = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
                  env=gcs.env)
  ok(again)
  assert 'Already done' in again.stderr


def test_a_single_pytree_local_in_gs_out_and_gs_in_local_out(layered, gs_path, tmp_path, gcs):
  in_path, x = layered
  single = tmp_path / 'single'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(single, sharded_state())
  serving = gs_path / 'serving'
  config = REPO / 'configs' / 'params_only_bf16.py'
  ok(run_job(config, f'--config.input.path={single}', f'--config.output.path={serving}',
             env=gcs.env))
  assert (serving / COMMIT_FILE).exists()
  want = {k: bf16(v) if k.startswith('params/') else v for k, v in x.items()
          if k.startswith('params/') or k == 'step'}
  assert_same(read(serving), want)
  # And back: gs:// in, the local disk out.
  back = tmp_path / 'back'
  ok(run_job(write_config(tmp_path, {'transforms': [dict(op='cast', pattern='.*', dtype='float32')]}),
             f'--config.input.path={serving}', f'--config.output.path={back}', env=gcs.env))
  assert_same(read(back), {k: v.astype(np.float32) if k.startswith('params/') else v
                           for k, v in want.items()})


def test_two_processes_on_gs(gs_input, every_family_on_disk, gs_path, tmp_path, gcs):
  config, want, _ = every_family_on_disk
  in_path, _ = gs_input
  out = gs_path / 'out'
  ok(launch(2, f'--config={config}', f'--config.input.path={in_path}',
            f'--config.output.path={out}', log_dir=tmp_path / 'logs', env=gcs.env))
  assert_same(read(out / '3' / 'default'), want)


def test_sigkill_in_the_commit_hides_the_output_until_a_rerun_finishes_it(
    gs_input, every_family_on_disk, gs_path, tmp_path, gcs):
  config, want, _ = every_family_on_disk
  in_path, x = gs_input
  out = gs_path / 'out'
  # An older output of another surgery, replaced with overwrite.
  ok(run_job(write_config(tmp_path, {'transforms': [dict(op='drop', pattern='head/.*')]}, 'old.py'),
             f'--config.input.path={in_path}', f'--config.output.path={out}', env=gcs.env))
  old = read(out / '3' / 'default')
  # Killed once every object is in place but the commit files: readers see no step 3.
  process = start_paused(config, in_path, out, 'rename', tmp_path / 'paused',
                         '--config.output.overwrite=True', env=gcs.env)
  process.kill()
  process.wait(timeout=60)
  assert (out / '3' / 'default' / '_METADATA').exists() and not (out / '3' / COMMIT_FILE).exists()
  assert checkpoints.visible_steps(out) == []
  with pytest.raises(ValueError, match='Found incomplete checkpoint'):
    ocp.StandardCheckpointer().restore(out / '3' / 'default')
  # The rerun finishes the commit from the validated staging folder, then finds it done.
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
                  '--config.output.overwrite=True', env=gcs.env)
  ok(rerun)
  assert 'Already done' in rerun.stderr
  assert checkpoints.visible_steps(out) == [3]
  assert_same(read(out / '3' / 'default'), want)
  assert sorted(p.name for p in out.iterdir()) == ['3', RECORD] and old.keys() != want.keys()


def test_a_stopped_run_on_gs_resumes_from_its_groups(gs_input, every_family_on_disk, gs_path, tmp_path,
                                                    gcs):
  config, want, _ = every_family_on_disk
  in_path, _ = gs_input
  out = gs_path / 'out'
  streamed = '--config.memory.host_budget_gb=1e-5'
  process = start_paused(config, in_path, out, 'group_written', tmp_path / 'paused', streamed,
                         env=gcs.env)
  process.kill()
  process.wait(timeout=60)
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', streamed,
                  env=gcs.env)
  ok(rerun)
  assert 'groups were written by an earlier run (groups 0)' in rerun.stderr
  assert_same(read(out / '3' / 'default'), want)
  assert sorted(p.name for p in out.iterdir()) == ['3', RECORD]


def test_overwrite_keeps_the_old_output_until_the_new_one_validates(gs_input, gs_path, tmp_path, gcs):
  in_path, x = gs_input
  out = gs_path / 'out'
  ok(run_job(write_config(tmp_path, {'transforms': [dict(op='drop', pattern='head/.*')]}, 'old.py'),
             f'--config.input.path={in_path}', f'--config.output.path={out}', env=gcs.env))
  old = read(out / '3' / 'default')
  failed = run_job(write_config(tmp_path, {'transforms': [dict(op='set_step', value=9)]}),
                   f'--config.input.path={in_path}', f'--config.output.path={out}',
                   '--config.output.overwrite=True',
                   env={**gcs.env, 'SURGERY_JOB_CORRUPT_OUTPUT': '1'})
  assert failed.returncode != 0 and 'validation failed' in failed.stderr
  assert checkpoints.visible_steps(out) == [3]
  assert_same(read(out / '3' / 'default'), old)
  assert 'params/head/kernel' not in old


def test_two_runs_on_one_gs_output_one_waits_out_the_lock(gs_path):
  from surgery_job import lock as lock_lib  # pylint: disable=import-outside-toplevel
  unit = gs_path / 'out' / '3'
  first = lock_lib.Lock(str(unit), timeout_seconds=60)
  first.acquire(wait_seconds=0)
  second = lock_lib.Lock(str(unit), timeout_seconds=60)
  with pytest.raises(Exception, match=r'is being written by another run \(host'):
    second.acquire(wait_seconds=0)
  first.release()
  second.acquire(wait_seconds=0)
  assert second.held() and not first.held()
  second.release()
  assert not (gs_path / 'out' / ('3' + lock_lib.SUFFIX)).exists()


def test_s3_is_a_one_line_error(layered, tmp_path):
  result = run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={layered[0]}',
                   '--config.output.path=s3://bucket/out')
  assert_bad_input(result, 'output.path s3://bucket/out: s3:// is not supported')


def test_an_unfinished_save_on_gs_is_not_read(gs_path, gcs, tmp_path):
  config = write_config(tmp_path, {'transforms': []})
  single = gs_path / 'single'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(single, sharded_state())
  (single / COMMIT_FILE).unlink()
  assert_bad_input(run_job(config, f'--config.input.path={single}',
                           f'--config.output.path={tmp_path / "out"}', env=gcs.env),
                   f'input.path {single} is an unfinished save: it has no {COMMIT_FILE}')
  manager_dir = gs_path / 'manager'
  checkpoints.save_manager(manager_dir, sharded_state(), step=3)
  (manager_dir / '3' / COMMIT_FILE).unlink()
  assert_bad_input(run_job(config, f'--config.input.path={manager_dir}',
                           f'--config.output.path={tmp_path / "out"}', env=gcs.env),
                   f'input.path {manager_dir} holds no committed step: {manager_dir / "3"} has no '
                   f'{COMMIT_FILE}')
  assert not (tmp_path / 'out').exists()


def test_a_gs_step_whose_item_has_no_commit_file_is_skipped(gs_path, gcs):
  root = gs_path / 'manager'
  for step in (3, 4):
    checkpoints.save_manager(root, sharded_state(), step=step)
  (root / '4' / 'default' / COMMIT_FILE).unlink()
  assert checkpoint.locate(str(root), 'latest', None).step == 3
  with pytest.raises(SurgeryError, match=f'input.step 4 is not a committed checkpoint: {root / "4"} '
                                         f'item default has no {COMMIT_FILE}'):
    checkpoint.locate(str(root), 4, None)


def test_a_prune_killed_midway_on_gs_is_finished_by_the_next_run(trained, gs_path, tmp_path, gcs):
  """A step whose commit file a killed prune deleted is out of sight but still stored: exported
  again, it is written anew; a rerun that is already done deletes it."""
  out = gs_path / 'out'
  config = write_config(tmp_path, SERVING)

  def export(*overrides):
    return run_job(config, f'--config.input.path={trained}', f'--config.output.path={out}',
                   *overrides, env=gcs.env)

  def kill_while_pruning(attempt: int) -> None:
    process = start_paused(config, trained, out, 'pruning', tmp_path / f'paused{attempt}',
                           '--config.input.step=2', '--config.output.max_to_keep=1', env=gcs.env)
    process.kill()
    process.wait(timeout=60)
    assert checkpoints.visible_steps(out) == [2]
    assert (out / '1' / 'default' / '_METADATA').exists() and (out / '1' / DELETING_MARKER).exists()

  ok(export('--config.input.step=[1,2]'))
  kill_while_pruning(1)
  ok(export('--config.input.step=1'))
  assert checkpoints.visible_steps(out) == [1, 2] and not (out / '1' / DELETING_MARKER).exists()
  assert_same(read(out / '1' / 'default'), expected(1))
  kill_while_pruning(2)
  done = export('--config.input.step=2', '--config.output.max_to_keep=1')
  ok(done)
  assert 'Already done' in done.stderr
  assert sorted(p.name for p in out.iterdir()) == ['2', RECORD]
  assert json.loads((out / RECORD).read_text()) == {'steps': [1, 2]}
  assert_same(read(out / '2' / 'default'), expected(2))
