"""Pruning (`output.max_to_keep`), the names of step folders, and the steps 'new' takes: only the
job's own committed step folders count as exported steps, and only they are ever deleted."""

import shutil
import subprocess

import numpy as np

import checkpoints
from jobs import REPO, assert_unlocked, job_command, job_env, ok, outcome, write_config
from surgery_job import inspect, output
from surgery_job.report import REPORT
from test_bad_input import assert_bad_input, assert_refused, digest
from test_safety import start_paused
from test_scheduled import SERVING, expected, trained  # noqa: F401  (trained: a fixture)

DELETING = '.orbax-checkpoint-tmp-surgery-deleting'


def command(tmp_path, in_path, out, *overrides: str) -> list[str]:
  return job_command(write_config(tmp_path, SERVING), f'--config.input.path={in_path}',
                     f'--config.output.path={out}', *overrides)


def run(tmp_path, in_path, out, *overrides: str, env: dict | None = None):
  return subprocess.run(command(tmp_path, in_path, out, *overrides), cwd=REPO, env=job_env(env=env),
                        capture_output=True, text=True, timeout=300, check=False)


def exported_folders(out) -> list[str]:
  """The folders of `out` that hold a report of the job: its exported steps, however named."""
  return sorted(p.name for p in out.iterdir() if (p / REPORT).is_file())


def assert_exported_values(out, steps) -> None:
  for step in steps:
    got = checkpoints.flat_numpy(checkpoints.restore_plain(out / str(step) / 'default'))
    want = expected(step)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'step {step} {key}')


def fake_step(root, name: str) -> None:
  """A folder laid out as an exported step (an item, the commit file, a report), data aside."""
  (root / name / 'default').mkdir(parents=True)
  for file in ('commit_success.txt', REPORT, 'default/_METADATA'):
    (root / name / file).write_text('{}')


def test_folders_that_are_not_exported_steps_are_never_counted_or_deleted(tmp_path):
  root = tmp_path / 'out'
  for name in ('1', '2', '3', '004', '002', '³', '٣', 'step_5', '7.orbax-checkpoint-tmp-1'):
    fake_step(root, name)
  (root / '0').mkdir()
  (root / '0' / 'notes.txt').write_text('mine')
  (root / '9').mkdir()  # A step folder with no commit file and no report: not the job's.
  assert output.steps(root) == [1, 2, 3]
  output.prune(root, keep=1, lock_timeout_seconds=60)
  assert sorted(p.name for p in root.iterdir()) == sorted(
      ['0', '3', '004', '002', '³', '٣', 'step_5', '7.orbax-checkpoint-tmp-1', '9'])
  assert (root / '0' / 'notes.txt').read_text() == 'mine'


def test_prune_checks_each_step_again_under_its_lock(tmp_path, monkeypatch):
  """Another run pruned step 1 after this run listed the steps: it is not there any more, and its
  folder out of readers' sight is that run's to delete."""
  root = tmp_path / 'out'
  for name in ('1', '2', '3'):
    fake_step(root, name)
  listed = output.steps(root)
  (root / '1').rename(root / ('1' + DELETING))
  monkeypatch.setattr(output, 'steps', lambda _: listed)
  output.prune(root, keep=1, lock_timeout_seconds=60)
  assert sorted(p.name for p in root.iterdir()) == ['3']


def test_max_to_keep_never_deletes_another_writers_steps(trained, tmp_path):
  """Steps `0` and `2024` that a plain CheckpointManager wrote beside the exports are not exported
  steps: `2024` is not the newest of them, and neither is ever deleted."""
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=[1]'))
  for name in ('0', '2024'):
    shutil.copytree(trained / '1', out / name)
  before = digest(out / '0'), digest(out / '2024')
  ok(run(tmp_path, trained, out, '--config.input.step=all', '--config.output.max_to_keep=2'))
  assert (digest(out / '0'), digest(out / '2024')) == before
  assert exported_folders(out) == ['2', '4']
  assert_exported_values(out, [2, 4])
  assert_unlocked(out)


def test_odd_step_folder_names(trained, tmp_path):
  """`004` is not step 4 and `002` not step 2 (CheckpointManager names steps `4` and `2`), `³` is no
  step at all (in the output: a folder that is no checkpoint, refused in one line); in an input,
  `٣` is not step 3 and `³` is no step either."""
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=[1,2]'))
  shutil.copytree(out / '2', out / '004')
  shutil.copytree(out / '2', out / '002')
  ok(run(tmp_path, trained, out, '--config.input.step=new', '--config.output.max_to_keep=2'))
  assert exported_folders(out) == ['002', '004', '2', '4']
  assert_exported_values(out, [2, 4])
  (out / '³').mkdir()
  assert_bad_input(run(tmp_path, trained, out, '--config.input.step=all'),
                   f'output.path {out} holds ³, which is not a checkpoint')
  odd_input = tmp_path / 'in'
  shutil.copytree(trained, odd_input)
  (odd_input / '³').mkdir()
  shutil.copytree(odd_input / '2', odd_input / '٣')
  assert inspect.main([str(odd_input)]) == 0
  info = inspect.inspect(str(odd_input))
  assert [(s['step'], s['folder']) for s in info['steps']] == [
      (1, '1'), (2, '2'), (4, '4'), (6, '6.orbax-checkpoint-tmp-1234')]
  assert info['step'] == 4


def test_new_decides_by_the_steps_the_export_ever_held(trained, tmp_path):
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=all', '--config.output.max_to_keep=2'))
  assert exported_folders(out) == ['2', '4']
  shutil.rmtree(out / '4')  # By hand.
  again = run(tmp_path, trained, out, '--config.input.step=new', '--config.output.max_to_keep=2')
  ok(again)
  assert 'Nothing to convert' in again.stderr
  assert exported_folders(out) == ['2']


def test_watch_with_output_step_is_refused(tmp_path):
  assert_refused(outcome({**SERVING, 'watch': {'enabled': True, 'idle_timeout_seconds': 0.0},
                          'input': {'path': str(tmp_path / 'in')},
                          'output': {'path': str(tmp_path / 'out'), 'step': 7}}),
                 'config: output.step is set but watch.enabled converts each new input step '
                 'into its own output step')


def test_a_rerun_that_is_already_done_finishes_a_stopped_prune(trained, tmp_path):
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=all'))
  # Killed once steps 1 and 2 are out of readers' sight, before they are deleted.
  process = start_paused(write_config(tmp_path, SERVING), trained, out, 'pruning',
                         tmp_path / 'paused', '--config.input.step=4', '--config.output.max_to_keep=1')
  process.kill()
  process.wait(timeout=60)
  assert checkpoints.visible_steps(out) == [4] and len(list(out.glob('*' + DELETING + '*'))) == 2
  done = run(tmp_path, trained, out, '--config.input.step=4', '--config.output.max_to_keep=1')
  ok(done)
  assert 'Already done' in done.stderr
  assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ['4']
  assert_exported_values(out, [4])
  assert_unlocked(out)


def test_a_failing_prune_does_not_fail_the_committed_run(trained, tmp_path):
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=[1]'))
  result = run(tmp_path, trained, out, '--config.input.step=[2]', '--config.output.max_to_keep=1',
               env={'SURGERY_JOB_FAULT': 'pruning'})
  ok(result)
  assert 'injected fault at pruning' in result.stderr
  assert_exported_values(out, [2])
  assert_unlocked(out)


def test_two_runs_pruning_one_export_directory(trained, tmp_path):
  """The README's watch and cron run sharing an export directory of many old steps."""
  out = tmp_path / 'out'
  ok(run(tmp_path, trained, out, '--config.input.step=[1]'))
  for step in range(2, 152):
    shutil.copytree(out / '1', out / str(step))
  runs = [subprocess.Popen(command(tmp_path, trained, out, f'--config.input.step={step}',
                                   f'--config.output.step={1000 + step}',
                                   '--config.output.max_to_keep=1'),
                           cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
          for step in (1, 2)]
  errors = [process.communicate(timeout=300)[1] for process in runs]
  for process, stderr in zip(runs, errors):
    assert process.returncode == 0, stderr[-3000:]
  # Step 1001 stays when its own run still held it while the other one pruned.
  assert exported_folders(out) in (['1002'], ['1001', '1002'])
  assert output.exported_before(out) == {1, 1001, 1002}  # Both commits on record.
  assert not list(out.glob('*' + DELETING + '*'))
  assert_unlocked(out)
