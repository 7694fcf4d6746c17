"""The staging folder on its own: recognised as the job's, cleaned marker last, old output put back."""

import shutil

import pytest

from surgery_job import output
from surgery_job.errors import SurgeryError


OTHER = 'e' * 64  # The fingerprint of another surgery: nothing staged is resumed.


def staged(tmp_path) -> output.Staging:
  staging = output.Staging(tmp_path / 'out' / '3')
  staging.create('f' * 64)
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
  assert calls == [str(staging.checkpoint)]
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
