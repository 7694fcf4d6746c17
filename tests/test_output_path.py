"""Where a run may write: never over its own input (symlinks resolved), never into or over a folder
that is not a checkpoint, `output.overwrite` replacing a checkpoint of the same kind only, and never
through a symbolic link."""

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoints
from jobs import ok, outcome, run_job, write_config
from surgery_job import lock, output, paths
from test_bad_input import assert_bad_input, assert_refused, digest

DROP_HEAD = {'transforms': [dict(op='drop', pattern='head/.*')]}


def fields(in_path, out, **more) -> dict:
  return {'transforms': [], 'input': {'path': str(in_path)},
          'output': {'path': str(out), **more}}


@pytest.fixture
def trainer(layered, tmp_path):
  """A trainer's CheckpointManager directory (step 3) of its own, and its digest."""
  path = tmp_path / 'trainer'
  shutil.copytree(layered[0], path)
  return path, digest(path)


@pytest.fixture
def single(tmp_path):
  """A single PyTree checkpoint."""
  path = tmp_path / 'single'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, checkpoints.train_state(checkpoints.layered_params()))
  return path


# Item 2: the input replaced through a symlinked step folder.

def test_an_input_step_linked_from_the_output_is_never_replaced(trainer, tmp_path):
  path, before = trainer
  view = tmp_path / 'view'
  view.mkdir()
  (view / '3').symlink_to(path / '3')
  result = run_job(write_config(tmp_path, DROP_HEAD), f'--config.input.path={view}',
                   f'--config.output.path={path}', '--config.output.overwrite=True')
  assert_bad_input(result, f'input step folder {view / "3"} (really {path / "3"}) is inside '
                           f'output.path {path}; the output must not overlap the input')
  assert digest(path) == before
  assert sorted(p.name for p in path.iterdir()) == ['3']


def test_an_input_item_linked_into_the_output_is_refused(trainer, tmp_path):
  path, before = trainer
  view = tmp_path / 'view'
  (view / '3').mkdir(parents=True)
  (view / '3' / 'default').symlink_to(path / '3' / 'default')
  assert_refused(outcome(fields(view, path, overwrite=True, step=5)),
                 f'input item {view / "3" / "default"} (really {path / "3" / "default"}) is inside '
                 f'output.path {path}')
  assert digest(path) == before and sorted(p.name for p in path.iterdir()) == ['3']


def test_an_output_inside_a_linked_input_step_is_refused(trainer, tmp_path):
  path, before = trainer
  view = tmp_path / 'view'
  view.mkdir()
  (view / '3').symlink_to(path / '3')
  out = path / '3' / 'export'
  assert_refused(outcome(fields(view, out)),
                 f'output.path {out} is inside input step folder {view / "3"} (really {path / "3"})')
  assert digest(path) == before


def test_gs_paths_are_compared_as_written():
  assert paths.real('gs://bucket/a/../b') == 'gs://bucket/a/../b'
  assert paths.inside('gs://bucket/out/3', 'gs://bucket/out')
  assert not paths.inside('gs://bucket/out2', 'gs://bucket/out')
  assert not paths.inside('/bucket/out/3', 'gs://bucket/out')


# Item 3: a single checkpoint's output never replaces an export directory.

def test_a_single_checkpoint_never_replaces_an_export_directory(single, trainer):
  path, before = trainer
  assert_refused(outcome(fields(single, path, overwrite=True)),
                 f'output.path {path} is a CheckpointManager directory (steps 3); a single PyTree '
                 'checkpoint never replaces it, with output.overwrite or without')
  assert digest(path) == before


def test_overwrite_replaces_a_single_checkpoint_with_a_single_checkpoint(single, tmp_path):
  out = tmp_path / 'out'
  overrides = (f'--config.input.path={single}', f'--config.output.path={out}')
  ok(run_job(write_config(tmp_path, {'transforms': []}), *overrides))
  assert 'params/head/kernel' in checkpoints.flat_numpy(checkpoints.restore_plain(out))
  ok(run_job(write_config(tmp_path, DROP_HEAD, 'drop.py'), *overrides, '--config.output.overwrite=True'))
  assert 'params/head/kernel' not in checkpoints.flat_numpy(checkpoints.restore_plain(out))


# Item 5: an output folder holding files that are not checkpoints.

@pytest.mark.parametrize('overwrite', [False, True])
def test_a_folder_with_unrelated_files_is_never_written_into(overwrite, layered, single, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  for in_path in (layered[0], single):
    assert_refused(outcome(fields(in_path, out, overwrite=overwrite)),
                   f'output.path {out} holds keep.txt, which is not a checkpoint')
  assert [p.name for p in out.iterdir()] == ['keep.txt']
  assert (out / 'keep.txt').read_text() == 'mine'


def test_a_step_folder_that_is_not_a_checkpoint_is_never_replaced(layered, tmp_path):
  out = tmp_path / 'out'
  (out / '3').mkdir(parents=True)
  (out / '3' / 'precious.txt').write_text('keep me')
  assert_refused(outcome(fields(layered[0], out, overwrite=True)),
                 f'output.path {out} holds 3, which is not a checkpoint')
  assert [p.name for p in (out / '3').iterdir()] == ['precious.txt']


def test_an_empty_folder_takes_a_single_checkpoint(single, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  ok(run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={single}',
             f'--config.output.path={out}'))
  assert 'params/head/kernel' in checkpoints.flat_numpy(checkpoints.restore_plain(out))


def test_what_runs_and_orbax_leave_beside_the_steps_is_allowed(layered, tmp_path):
  from surgery_job import output_folder  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'out'
  shutil.copytree(layered[0] / '3', out / '3')
  shutil.copytree(layered[0] / '3', out / 'step_4')  # Another Orbax step name.
  for name in (f'5{lock.SUFFIX}', f'5{lock.SUFFIX}.__lock'):
    (out / name).write_text('{}')
  for name in ('5' + output.SUFFIX, '2' + output.DELETING, '6.orbax-checkpoint-tmp-1234',
               'metadata'):
    (out / name).mkdir()
  assert output_folder.foreign(paths.of(out)) == []
  (out / '2024').mkdir()
  (out / '2024' / 'holiday.jpg').write_text('not a checkpoint')
  (out / 'notes').mkdir()
  assert output_folder.foreign(paths.of(out)) == ['2024', 'notes']


# Item 11: an output step folder that is a symbolic link.

def test_an_output_step_that_is_a_link_is_refused(baseline, layered, tmp_path):
  config, _ = baseline
  elsewhere = tmp_path / 'elsewhere'
  shutil.copytree(layered[0] / '3', elsewhere)
  before = digest(elsewhere)
  out = tmp_path / 'out'
  out.mkdir()
  (out / '3').symlink_to(elsewhere)
  result = run_job(config, f'--config.input.path={layered[0]}', f'--config.output.path={out}',
                   '--config.output.overwrite=True')
  assert_bad_input(result, f'step 3 of output.path {out} is a symbolic link to {elsewhere}; the job '
                           'neither writes through a link nor replaces one')
  assert (out / '3').is_symlink() and digest(elsewhere) == before
  assert sorted(p.name for p in out.iterdir()) == ['3']


def test_a_single_output_that_is_a_link_is_refused(single, tmp_path):
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  out = tmp_path / 'out'
  out.symlink_to(elsewhere)
  assert_refused(outcome(fields(single, out, overwrite=True)),
                 f'output.path {out} is a symbolic link to {elsewhere}')
  assert out.is_symlink() and list(elsewhere.iterdir()) == []


def test_a_link_left_in_a_staging_folder_is_unlinked_not_followed(baseline, layered, tmp_path):
  """What an overwrite of a linked step left before links were refused: the new step committed,
  the link moved into the staging folder. The next run removes the link and leaves its target."""
  config, want = baseline
  out = tmp_path / 'out'
  overrides = (f'--config.input.path={layered[0]}', f'--config.output.path={out}')
  ok(run_job(config, *overrides))
  elsewhere = tmp_path / 'elsewhere'
  shutil.copytree(layered[0] / '3', elsewhere)
  before = digest(elsewhere)
  staging = out / ('3' + output.SUFFIX)
  staging.mkdir()
  (staging / output.MARKER).write_text(json.dumps({'fingerprint': 'an earlier surgery'}))
  (staging / 'replaced').symlink_to(elsewhere)
  again = run_job(config, *overrides)
  ok(again)
  assert 'Already done' in again.stderr
  assert not staging.exists() and digest(elsewhere) == before
  got = checkpoints.flat_numpy(checkpoints.restore_plain(out / '3' / 'default'))
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
