"""The staging folder on its own: recognised as the job's, cleaned marker last, old output put back."""

import shutil

import pytest

from surgery_job import output
from surgery_job.errors import SurgeryError

KEY = {'fingerprint': 'f' * 64, 'input': 'i' * 64, 'topology': {'processes': 1, 'devices': 8}}
OTHER = {**KEY, 'fingerprint': 'e' * 64}  # Another surgery: nothing staged is resumed.


def staged(tmp_path, work: str = 'a' * 32) -> output.Staging:
  staging = output.Staging(tmp_path / 'out' / '3', work)
  staging.create(KEY)
  (staging.checkpoint / 'default' / 'd').mkdir(parents=True)
  (staging.checkpoint / 'default' / 'd' / 'data').write_bytes(b'x' * 100)
  return staging


def test_clean_up_interrupted_midway_leaves_a_folder_the_next_run_removes(tmp_path, monkeypatch):
  staging = staged(tmp_path)
  calls = []

  def killed_midway(path, *args, **kwargs):  # As a SIGKILL during the first rmtree would.
    calls.append(path)
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(shutil, 'rmtree', killed_midway)
    with pytest.raises(KeyboardInterrupt):
      staging.remove()
  assert calls == [str(staging.checkpoint.parent)]
  assert (staging.root / output.MARKER).is_file()  # The marker goes last: the folder stays ours.
  staging.recover(OTHER)
  assert not staging.root.exists()


def test_an_empty_folder_is_a_run_killed_before_its_marker(tmp_path):
  staging = output.Staging(tmp_path / 'out' / '3')
  staging.root.mkdir(parents=True)
  staging.recover(OTHER)
  assert not staging.root.exists()


def test_a_folder_it_did_not_make_is_refused(tmp_path):
  staging = output.Staging(tmp_path / 'out' / '3')
  staging.root.mkdir(parents=True)
  (staging.root / 'notes.txt').write_text('mine')
  with pytest.raises(SurgeryError, match='exists but was not made by surgery_job'):
    staging.recover(OTHER)
  assert (staging.root / 'notes.txt').read_text() == 'mine'


def test_an_output_moved_aside_is_put_back_only_where_the_unit_is_absent(tmp_path):
  staging = staged(tmp_path)
  staging.displaced.mkdir()
  (staging.displaced / 'old.txt').write_text('old')
  staging.recover(OTHER)
  assert (staging.unit / 'old.txt').read_text() == 'old' and not staging.root.exists()

  staging = staged(tmp_path)  # Killed after the new unit was renamed in: the old one goes.
  staging.displaced.mkdir()
  (staging.displaced / 'old.txt').write_text('older')
  staging.recover(OTHER)
  assert (staging.unit / 'old.txt').read_text() == 'old' and not staging.root.exists()


def test_commit_replaces_the_unit_and_removes_the_staging_folder(tmp_path):
  staging = staged(tmp_path)
  staging.unit.mkdir()
  (staging.unit / 'old.txt').write_text('old')
  staging.commit()
  assert sorted(p.name for p in staging.unit.iterdir()) == ['default']
  assert (staging.unit / 'default' / 'd' / 'data').read_bytes() == b'x' * 100
  assert not staging.root.exists()


def test_a_run_taking_the_work_over_renames_it_to_its_own(tmp_path):
  earlier = staged(tmp_path)
  earlier.add_group(0, ('a',), {'a': ((2,), 'float32', (1.0, 2.0))}, ['checkpoint.default.partial_save/s0'])
  later = output.Staging(earlier.unit, 'b' * 32)
  assert later.recover(KEY)
  assert not earlier.checkpoint.exists() and (later.checkpoint / 'default' / 'd' / 'data').is_file()
  assert later.written_groups() == {('a',): {'saves': ['checkpoint.default.partial_save/s0'],
                                             'digests': {'a': ((2,), 'float32', (1.0, 2.0))}}}
  # What the earlier run, alive without its lock, still writes goes to a path that no run reads,
  # and the next run removes it, even from a staging folder whose marker is gone.
  with pytest.raises(FileNotFoundError):
    earlier.add_group(1, ('b',), {}, [])
  assert list(later.written_groups()) == [('a',)]
  later.remove()
  earlier.records.mkdir(parents=True)
  (earlier.records / '2.json').write_text('{}')
  assert not later.recover(KEY) and not later.root.exists()


@pytest.mark.parametrize('change, reason', [
    ({'input': 'j' * 64}, 'the input changed since the stopped run'),
    ({'topology': {'processes': 2, 'devices': 8}},
     'the stopped run had 1 processes and 8 devices, this one 2 and 8')])
def test_work_of_other_input_bytes_or_topology_is_not_taken_over(change, reason, tmp_path, caplog):
  caplog.set_level('INFO', logger='absl')  # Whatever verbosity an earlier test left.
  staging = staged(tmp_path)
  assert not output.Staging(staging.unit, 'b' * 32).recover({**KEY, **change})
  assert not staging.root.exists()
  assert f'Starting over: {reason}' in caplog.text


def test_a_record_cut_short_is_left_out_and_an_interrupted_one_leaves_no_trace(tmp_path, monkeypatch):
  staging = staged(tmp_path)
  staging.add_group(0, ('a',), {}, ['s0'])
  staging.add_group(1, ('b',), {}, ['s1'])
  (staging.records / '1.json').write_text('{"outputs": ["b"], "dig')
  assert list(staging.written_groups()) == [('a',)]

  def disk_full(*args):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(output.paths.os, 'replace', disk_full)
  with pytest.raises(OSError):
    staging.add_group(2, ('c',), {}, ['s2'])
  assert list(staging.written_groups()) == [('a',)]
