"""The output protocol: how a surgery's result becomes visible, complete and validated, or not at all.

The unit of output is one step folder `OUT/<step>` of a CheckpointManager output (a run touches
its own step only, never the others), or `OUT` itself for a single PyTree checkpoint. Process 0
does every step below for a unit U; the other processes wait at barriers and write array shards.

0. Check the place: what the output folder and U may hold, and what overwrite may replace
   (`output_folder.py`); the job checks beforehand that nothing it reads lies in the output.
1. Lock: `U.surgery-lock` beside U, one live run per unit (`lock.py`).
2. Recover, under the lock: an older output that an earlier run had moved aside is put back where
   U is absent; an object-store commit that had begun is finished. A staging folder of the same
   surgery of the same input bytes on the same topology (`resume_key`), stopped before its commit,
   is taken over to resume from; anything else there is removed.
3. Decide: U holding this surgery's fingerprint is already done, unless `output.overwrite` asks
   for it again (but for the rerun of a run stopped in its commit); a checkpoint of U's kind is
   replaced only with `output.overwrite`; anything else is never replaced.
4. Stage: `U.orbax-checkpoint-tmp-surgery/` beside U, holding a marker (the run's `resume_key` and
   the name of its work folder) and the work folder, named by the run's lock token: `checkpoint/`,
   the future U, its partial saves, and a record of each group saved. Orbax takes a name holding
   `.orbax-checkpoint-tmp` for a save in progress, so no reader lists it as a step or restores it.
5. Write into `checkpoint/`, read it back and compare every leaf, add the report. Before each
   write the run checks that the lock is still its own, and stops if not.
6. Commit.
   - Local disk (POSIX): an older U is renamed into the staging folder (overwrite only),
     `checkpoint/` is renamed to U, and the staging folder is removed, its marker last.
   - Object store (gs://), where a folder cannot be renamed: `COMMITTING` goes into the staging
     folder (the new checkpoint is validated; from here the commit only goes forward). The commit
     file of an older U is deleted first, which hides it from every reader at once, then the rest
     of it. `checkpoint/` is moved to U object by object (each copy made by the store) with the
     commit files (`commit_success.txt`, Orbax's marker on object stores) last, and the staging
     folder is removed, its marker last. A run stopped midway leaves U without a commit file,
     which readers skip, and the next run finishes the move from the staging folder.
7. Release the lock.

A run that fails or is stopped leaves its staging folder for the next run on U and releases its
lock; a run killed outright leaves its lock as well, which the next run takes over once it sees
the owner gone. A staging folder is the job's own when its name has the suffix and it holds the
marker, or only work folders (a run killed before writing the marker, or one that lost its lock
and wrote on after the folder was removed).

After the commit, `output.max_to_keep` prunes the directory's older exported steps
(`exported_step`, nothing else), each under its own lock, and process 0 adds the step to the
directory's record of the steps it has held (`record_export`), which `input.step='new'` reads.
"""

import dataclasses
import hashlib
import json
import os
import re
import time
import uuid

import jax
import orbax.checkpoint as ocp
from absl import logging

from surgery_job import checkpoint, faults, lock as lock_lib, output_folder, paths
from surgery_job.checkpoint import COMMIT_FILE
from surgery_job.errors import SurgeryError
from surgery_job.output_folder import RECORD
from surgery_job.report import REPORT

MARKER = 'SURGERY_JOB_STAGING'
COMMITTING = 'COMMITTING'  # Object stores: the staged checkpoint is validated and being moved.
SUFFIX = '.orbax-checkpoint-tmp-surgery'
DELETING = '.orbax-checkpoint-tmp-surgery-deleting'  # A pruned step, out of readers' sight.
DELETING_MARKER = 'SURGERY_JOB_DELETING'  # Object stores: in a unit being deleted, until its end.
# How CheckpointManager names step folders by default, and the only name the job gives one: `3`.
STEP_NAMES = ocp.path.step.standard_name_format()
_WORK_FOLDER = re.compile(r'[0-9a-f]{32}')  # A run's lock token (`lock.Lock.token`).


# Fields that change how a run goes, not the bits it writes.
_NOT_THE_SURGERY = ('memory', 'dry_run', 'watch')
_NOT_THE_OUTPUT = ('path', 'overwrite', 'wait_seconds', 'lock_timeout_seconds', 'max_to_keep')


def fingerprint(config, input_location) -> str:
  """What makes two runs the same surgery: the resolved input step (its real path: a symlink to it is
  the same input) and the config, less where the output goes and how the run goes (the memory
  budget, the lock, the watch: same bits)."""
  fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_THE_SURGERY}
  fields['input'] = {'path': paths.real(input_location.root), 'step': input_location.step,
                     'item': input_location.item, 'items': list(input_location.items),
                     'copied': list(input_location.copied)}
  fields['output'] = {k: v for k, v in fields['output'].items() if k not in _NOT_THE_OUTPUT}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def resume_key(run_fingerprint: str, source) -> dict:
  """What a stopped run must share with this one for its groups to be taken over: the surgery; the
  input's bytes, told apart without reading them by each file's size, modification time and inode
  (generation on an object store), which a rewrite of the input in place changes; the topology
  (each process writes its own part of a partial save)."""
  stamps = json.dumps(paths.stamps(source.item_dir)).encode()
  return {'fingerprint': run_fingerprint, 'input': hashlib.sha256(stamps).hexdigest(),
          'topology': {'processes': jax.process_count(), 'devices': jax.device_count()}}


def _not_resumable(marker: dict, key: dict) -> str | None:
  """Why the work that a staging folder's `marker` describes is not for a run of `key`: '' where
  there is no work worth naming; None when it is for it."""
  if not _WORK_FOLDER.fullmatch(str(marker.get('work'))):
    return ''
  if marker.get('fingerprint') != key['fingerprint']:
    return 'the stopped run was another surgery'
  if marker.get('input') != key['input']:
    return ('the input changed since the stopped run (a file of it has another size, time or '
            'inode)')
  was, now = marker.get('topology') or {}, key['topology']
  if was != now:
    return (f'the stopped run had {was.get("processes")} processes and {was.get("devices")} '
            f'devices, this one {now["processes"]} and {now["devices"]}')
  return None


def present(unit: paths.Path) -> bool:
  """Whether a reader sees `unit`: on an object store, only once its commit file is there."""
  if paths.on_object_store(unit):
    return (unit / COMMIT_FILE).exists()
  return unit.exists()


def existing_fingerprint(unit: paths.Path) -> str | None:
  """The fingerprint in the report of the output already at `unit`, if it has one."""
  try:
    return json.loads((unit / REPORT).read_text()).get('fingerprint')
  except (OSError, ValueError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a run's output goes: step `step` of the CheckpointManager directory `root`, or the
  single PyTree checkpoint `root` (step None)."""
  root: paths.Path
  step: int | None

  @property
  def unit(self) -> paths.Path:
    """What one run commits: the step folder, or the whole checkpoint."""
    return self.root if self.step is None else self.root / str(self.step)

  def __str__(self) -> str:
    return (f'output.path {self.root}' if self.step is None
            else f'step {self.step} of output.path {self.root}')


class Staging:
  """The staging folder of `unit`. Its marker says which surgery of which input bytes on which
  topology it holds, and names the work folder of the run that owns it: the checkpoint, the
  partial saves and the record of groups, in a folder named by that run's lock token (`work`).
  A run resuming an earlier one's groups renames that folder to its own name first, so whatever
  the earlier run still writes, if it lives on without its lock, goes to a path no run uses."""

  def __init__(self, unit: paths.PathLike, work: str | None = None):
    self.unit = paths.of(unit)
    self.work = work
    self.finished_a_commit = False  # Set by `recover`: it put a stopped run's output in place.

  @property
  def root(self) -> paths.Path:
    return self.unit.with_name(self.unit.name + SUFFIX)

  @property
  def checkpoint(self) -> paths.Path:
    """What Orbax writes and the commit renames to the unit."""
    return self.root / self.work / 'checkpoint'

  @property
  def displaced(self) -> paths.Path:
    return self.root / 'replaced'

  @property
  def records(self) -> paths.Path:
    """The groups written so far, one file each with its digests, for a run that resumes."""
    return self.root / self.work / 'groups'

  def recover(self, key: dict | None) -> bool:
    """Deals with what an earlier run left: an output it had moved aside is put back; its work is
    taken over when that run was the same surgery of the same input bytes on the same topology
    (`resume_key`; None: nothing is), stopped before its commit (returns True); anything else is
    removed."""
    if not self.root.exists():
      return False
    if not (self.root / MARKER).is_file() and not all(
        _WORK_FOLDER.fullmatch(p.name) for p in self.root.iterdir()):
      raise SurgeryError(f'{self.root} exists but was not made by surgery_job; remove it or '
                         'choose another output.path')
    marker = self._marker()
    if (self.root / COMMITTING).exists():
      # A marker without a work folder is an older version's, whose checkpoint was at the top.
      self._move_into_place(self.root / str(marker.get('work', '')) / 'checkpoint')
      self.finished_a_commit = True
      return False
    if self.displaced.exists() and not self.unit.exists():
      self.displaced.rename(self.unit)
    if key is None:
      self.remove()
      return False
    why = _not_resumable(marker, key)
    if why is None and (self.root / marker['work']).is_dir():
      self._take_over(marker['work'], key)
      return True
    if why:
      logging.info('Starting over: %s.', why)
    self.remove()
    return False

  def _marker(self) -> dict:
    try:
      marker = json.loads((self.root / MARKER).read_text())
    except (OSError, ValueError):
      return {}
    return marker if isinstance(marker, dict) else {}

  def _take_over(self, work: str, key: dict) -> None:
    """Makes an earlier run's work this run's: its folder renamed to this run's name; the folders
    of runs that lost their lock while writing deleted."""
    if work != self.work:
      (self.root / work).rename(self.root / self.work)
    self._write_marker(key)
    for stray in self.root.iterdir():
      if _WORK_FOLDER.fullmatch(stray.name) and stray.name != self.work:
        stray.unlink() if paths.is_link(stray) else stray.rmtree()

  def _write_marker(self, key: dict) -> None:
    paths.write_whole(self.root / MARKER, json.dumps(
        {**key, 'work': self.work, 'created': time.time(), 'pid': os.getpid()}))

  def written_groups(self) -> dict[tuple[str, ...], dict]:
    """{group outputs: {'digests': ..., 'saves': its partial saves}} of the groups on record; a
    damaged record is left out (its group is written again)."""
    groups = {}
    for name in sorted(paths.listing(self.records)):
      if not name.endswith('.json'):
        continue
      try:
        entry = json.loads((self.records / name).read_text())
        groups[tuple(entry['outputs'])] = {
            'saves': [str(save) for save in entry['saves']],
            'digests': {k: (tuple(shape), dtype, tuple(sums))
                        for k, (shape, dtype, sums) in entry['digests'].items()}}
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if jax.process_index() == 0:
          logging.warning('Ignoring the damaged record %s (its group is written again): %s',
                          self.records / name, e)
    return groups

  def add_group(self, index: int, outputs: tuple[str, ...], digests: dict,
                saves: list[str]) -> None:
    """Records a group whose partial saves (one per item) finished: a file of its own, written
    whole or not at all."""
    paths.write_whole(self.records / f'{index}.json', json.dumps(
        {'outputs': list(outputs), 'digests': digests, 'saves': saves}))

  def remove(self) -> None:
    """Deletes the staging folder, its marker last: a folder interrupted midway stays ours. A link
    in it is removed, never followed."""
    for child in self.root.iterdir():
      if child.name != MARKER:
        child.rmtree() if child.is_dir() and not paths.is_link(child) else child.unlink()
    (self.root / MARKER).unlink(missing_ok=True)
    if self.root.exists():  # On an object store the folder went with its last object.
      self.root.rmdir()

  def create(self, key: dict) -> None:
    self.records.mkdir(parents=True)
    self._write_marker(key)

  def commit(self) -> None:
    """Puts the validated checkpoint in place of the unit; an older output goes only now."""
    if paths.on_object_store(self.unit):
      (self.root / COMMITTING).write_text(_REPLACING)
      self._move_into_place(self.checkpoint)
      return
    if self.unit.exists():
      self.unit.rename(self.displaced)
    faults.at('rename')
    self.checkpoint.rename(self.unit)
    self.remove()

  def _move_into_place(self, checkpoint: paths.Path) -> None:
    """The object-store commit of the staged `checkpoint`, from wherever an earlier run stopped
    (`COMMITTING` says where): an older unit hidden, then deleted; the checkpoint moved object by
    object (server side), its commit files last."""
    committing = self.root / COMMITTING
    if committing.read_text() == _REPLACING:
      if self.unit.exists():  # Nothing moved yet: everything here is the older output.
        _hide_and_delete(self.unit)
      committing.write_text(_MOVING)
    # What an earlier run moved is in place already; the commit files go last, the unit's own
    # (the shallowest) at the very end.
    staged = sorted(paths.files(checkpoint), key=lambda f: (
        f.name == COMMIT_FILE, -len(f.parts) if f.name == COMMIT_FILE else 0))
    for index, source in enumerate(staged):
      if source.name == COMMIT_FILE and (index == 0 or staged[index - 1].name != COMMIT_FILE):
        faults.at('rename')  # Everything but the commit files is in place.
      paths.move(source, self.unit / source.relative_to(checkpoint))
    self.remove()


_REPLACING, _MOVING = 'replacing', 'moving'  # The object-store commit's two stages.


class LockLost(RuntimeError):
  pass


class Claim:
  """This run's hold on its output unit (process 0): the lock, taken with the steps that must
  happen under it before any data moves."""

  def __init__(self, target: Target, timeout_seconds: float):
    self.target = target
    self.lock = lock_lib.Lock(target.unit, timeout_seconds)
    self.staging = Staging(target.unit, self.lock.token)
    self.made_root = False
    self.staging_ours = False  # The staging folder is this run's to write (or resume).

  def acquire(self, key: dict, overwrite: bool, wait_seconds: float) -> str:
    """Locks, recovers and decides: 'done' when the unit already holds this surgery, 'resume' when
    an earlier run of it (`resume_key`) left groups to go on from, else 'start'."""
    run_fingerprint = key['fingerprint']
    root = self.target.root
    if root.exists() and not root.is_dir() and not paths.on_object_store(root):
      raise SurgeryError(f'output.path {root} is a file')
    if self.target.step is not None and (root / '_METADATA').exists():
      raise SurgeryError(f'output.path {root} is a single PyTree checkpoint, not a '
                         'CheckpointManager directory for step folders')
    _refuse(output_folder.link_refusal(self.target.unit, str(self.target)))
    if self.target.step is not None:
      _refuse(output_folder.export_directory_refusal(root))
    self.made_root = self.target.step is not None and not root.exists()
    self.lock.acquire(wait_seconds)
    resumable = self.staging.recover(key)
    unit = self.target.unit
    if (unit / DELETING_MARKER).exists():  # What a stopped prune left of an older export.
      _hide_and_delete(unit)
    _refuse(output_folder.unit_refusal(unit, str(self.target), single=self.target.step is None))
    if paths.listing(unit):  # Seen by readers or not: only overwrite replaces it.
      found = existing_fingerprint(unit) if present(unit) else None
      # With overwrite the user asks for it again, unless this is the rerun of a run of it that was
      # stopped committing: its output, just put in place, is what was asked for.
      if found == run_fingerprint and (not overwrite or self.staging.finished_a_commit):
        if resumable:
          self.staging.remove()
        self._record()
        return 'done'
      if not overwrite:
        raise SurgeryError(_exists(self.target, found, run_fingerprint))
    self.staging_ours = True
    return 'resume' if resumable else 'start'

  def discard(self) -> None:
    """After bad input: what this run staged is worth nothing to a rerun, so it goes now."""
    if self.staging_ours and self.lock.held() and self.staging.root.exists():
      self.staging.remove()

  def check(self) -> None:
    """Before each write: once another run has taken the lock over, what is staged is its own, and
    this run stops."""
    if not self.lock.held():
      raise LockLost(f'lost the lock of {self.target.unit} to another run; stopped before writing '
                     'more, nothing committed')

  def commit(self) -> None:
    self.check()
    self.staging.commit()
    self._record()

  def _record(self) -> None:
    """Adds the step this run holds to its output directory's record (`record_export`). After
    the commit: a failure here is logged, not the run's."""
    if self.target.step is None:
      return
    try:
      record_export(self.target.root, self.target.step)
    except (OSError, ValueError) as e:  # tensorstore's errors are ValueErrors.
      logging.warning('Could not add step %d to %s: %s', self.target.step,
                      self.target.root / RECORD, str(e).splitlines()[0] if str(e) else e)

  def release(self) -> None:
    """Gives the unit up; an output directory this run made and left empty goes too."""
    self.lock.release()
    if self.made_root:
      try:
        self.target.root.rmdir()
      except (OSError, ValueError):  # Not empty (epath says so with a ValueError).
        pass


def _exists(target: Target, found: str | None, run_fingerprint: str) -> str:
  """Why a run without overwrite leaves `target`, which holds the surgery `found` (None: not one
  this job wrote), as it is."""
  return f'{target} exists' + (
      f' and holds another surgery (fingerprint {found[:12]}, this run {run_fingerprint[:12]})'
      if found else '') + '; set output.overwrite=True to replace it'


def dry_run_note(target: Target, run_fingerprint: str, overwrite: bool) -> str | None:
  """What the real run would find at `target`, looked at without its lock: refused, or already
  done; None when it would write it."""
  if overwrite or not paths.listing(target.unit):
    return None
  found = existing_fingerprint(target.unit) if present(target.unit) else None
  if found == run_fingerprint:
    return f'{target} already holds this surgery: the real run would be done at once'
  return f'the real run would be refused: {_exists(target, found, run_fingerprint)}'


def _refuse(refusal: str | None) -> None:
  if refusal:
    raise SurgeryError(refusal)


def _named_step(name: str) -> int | None:
  """The step of a folder named `name` as the job names steps (`STEP_NAMES`: `3`, never `003`,
  `step_3` or `³`); None for any other name."""
  step = checkpoint.step_of(name)
  return step if step is not None and STEP_NAMES.build_name(step) == name else None


def exported_step(folder: paths.Path) -> int | None:
  """The step `folder` holds if it is a committed output step of the job: named as the job names
  steps (`_named_step`), holding the commit file (the last file a commit puts in place, and what
  readers on an object store go by) and the job's report. Anything else (a user's folder, a step
  of another writer, an unfinished save) is no exported step: never counted, never deleted."""
  step = _named_step(folder.name)
  if step is None:
    return None
  files = {name for name, (is_dir, _) in paths.listing(folder).items() if not is_dir}
  return step if {COMMIT_FILE, REPORT} <= files else None


def steps(root: paths.Path) -> list[int]:
  """The exported steps of the output directory `root` (`exported_step`), oldest first."""
  return sorted(step for name, (is_dir, _) in paths.listing(root).items()
                if is_dir and (step := exported_step(root / name)) is not None)


def _records(data: bytes | None) -> set[int]:
  try:
    found = json.loads(data)['steps'] if data is not None else []
  except (ValueError, TypeError, KeyError):
    found = []  # Damaged: the steps in place still count.
  return {step for step in found if isinstance(step, int)} if isinstance(found, list) else set()


def exported_before(root: paths.Path) -> set[int]:
  """Every step the output directory `root` has held (its record), pruned or deleted since or not."""
  return _records(paths.Lease(root / RECORD).read()) if root.is_dir() else set()


def record_export(root: paths.Path, step: int) -> None:
  """Adds `step` to the record of `root`: read, then replaced only if no other run changed it
  meanwhile (runs on other steps of `root` commit at the same time), else read again."""
  record = paths.Lease(root / RECORD)
  while step not in (held := _records(record.read())):
    if record.write_if_unchanged(json.dumps({'steps': sorted(held | {step})}).encode()):
      return


def _hide_and_delete(unit: paths.Path) -> None:
  """Deletes an object-store unit so that no reader sees it half gone: marked first (a deletion
  stopped midway is finished by the next run that finds the mark), its commit files next, its
  own (the shallowest) before its items', then the rest, the mark last."""
  marker = unit / DELETING_MARKER
  marker.write_text('')
  found = [f for f in paths.files(unit) if f != marker]
  for commit_file in sorted((f for f in found if f.name == COMMIT_FILE), key=lambda f: len(f.parts)):
    commit_file.unlink(missing_ok=True)
  faults.at('pruning')  # Out of readers' sight, not deleted yet.
  for file in found:
    file.unlink(missing_ok=True)
  marker.unlink(missing_ok=True)
  paths.remove_tree(unit)  # The folders a disk keeps.


def _stopped_deletions(root: paths.Path) -> list[paths.Path]:
  """What deletions stopped midway left in `root`: steps renamed aside (a disk), marked units (an
  object store)."""
  listed = paths.listing(root)
  marked = [root / name for name, (is_dir, _) in listed.items()
            if paths.on_object_store(root) and is_dir and _named_step(name) is not None
            and DELETING_MARKER in paths.listing(root / name)]
  return [root / name for name in listed if DELETING in name] + marked


def prune(root: paths.Path, keep: int, lock_timeout_seconds: float) -> None:
  """Deletes all but the newest `keep` exported steps of the output directory `root`, and what an
  earlier prune stopped midway left."""
  for step in steps(root)[:-keep]:
    if _hide_under_lock(root / str(step), lambda unit: exported_step(unit) is not None,
                        lock_timeout_seconds):
      logging.info('Deleted output step %d (output.max_to_keep=%d).', step, keep)
  for leftover in _stopped_deletions(root):  # This run's, and those of runs stopped midway.
    if DELETING in leftover.name:
      faults.at('pruning')  # Out of readers' sight, not deleted yet.
      paths.remove_tree(leftover)
    else:
      _hide_under_lock(leftover, lambda unit: (unit / DELETING_MARKER).exists(), lock_timeout_seconds)


def _hide_under_lock(unit: paths.Path, still_to_go, lock_timeout_seconds: float) -> bool:
  """Takes `unit` out of readers' sight at once, under its lock: renamed aside on a disk (deleted
  after), deleted on an object store (commit files first). A unit another run holds is left
  alone; `still_to_go(unit)` is asked again under the lock, as another run may have deleted it
  meanwhile. Whether it went."""
  unit_lock = lock_lib.Lock(unit, lock_timeout_seconds)
  try:
    unit_lock.acquire(wait_seconds=0)
  except SurgeryError:
    return False
  try:
    if not still_to_go(unit):
      return False
    if paths.on_object_store(unit):
      _hide_and_delete(unit)
    else:
      unit.rename(unit.with_name(f'{unit.name}{DELETING}-{uuid.uuid4().hex[:8]}'))
  finally:
    unit_lock.release()
  return True


def sweep_abandoned(root: paths.Path, input_steps: set[int], lock_timeout_seconds: float) -> None:
  """What stopped runs left beside the steps of the output directory `root` for input steps that
  are gone (the trainer deleted them): no run will resume that staging folder or take that lock
  again. Each is dealt with under its lock, as a run would (an output moved aside goes back, a
  commit under way on an object store is finished), then removed; a unit a live run holds is left."""
  units = set()
  for name in paths.listing(root):
    for suffix in (SUFFIX, lock_lib.SUFFIX):
      step = name[:-len(suffix)] if name.endswith(suffix) else ''
      if step.isdecimal() and str(int(step)) == step and int(step) not in input_steps:
        units.add(root / step)
  for unit in sorted(units, key=lambda u: int(u.name)):
    unit_lock = lock_lib.Lock(unit, lock_timeout_seconds)
    try:
      unit_lock.acquire(wait_seconds=0)
    except SurgeryError:
      continue
    try:
      Staging(unit, unit_lock.token).recover(None)
    finally:
      unit_lock.release()
    logging.info('Removed what a stopped run left for output step %s, whose input step is gone.',
                 unit.name)
