"""Leaves passed through unchanged are copied as their stored chunks: the output holds what the
decode-encode path writes, as Orbax's reader, inspect and diff see it, on 1 and 2 processes."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from jobs import launch, ok, outcome, write_config
from surgery_job import diff, faults, inspect, job, paths, stored_chunks
from test_memory import float32_checkpoint

RENAME = [dict(op='rename', pattern=r'(.*)/kernel', replacement=r'\1/w')]
# The leaves whose chunks are one per shard with no shard held twice: the kernels, sharded over
# both axes of the mesh, and their moments; the biases are replicated.
COPIED = sorted(f'{root}layer_{i}/w' for i in range(3) for root in ('params/', 'opt_state/0/mu/', 'opt_state/0/nu/'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Params and their Adam state after a step, at step 3: kernels of 128 KiB (chunks of 16 KiB,
  which OCDBT keeps in its data files) sharded over a 2x4 mesh, replicated biases."""
  rng = np.random.default_rng(0)
  params = {f'layer_{i}': {'kernel': rng.standard_normal((64, 512), np.float32),
                           'bias': rng.standard_normal((512,), np.float32)} for i in range(3)}
  mesh = checkpoints.mesh_2x4()

  def place(path, x):
    spec = P('data', 'model') if jax.tree_util.keystr(path).endswith("['kernel']") else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  path = tmp_path_factory.mktemp('trained') / 'ckpt'
  checkpoints.save_manager(path, jax.tree_util.tree_map_with_path(place, checkpoints.train_state(params)))
  return path


def run(in_path, out, copy: bool = True) -> dict:
  assert outcome({'transforms': RENAME, 'input': {'path': str(in_path)},
                  'output': {'path': str(out), 'copy_stored_chunks': copy}}) == 'ok'
  return json.loads((out / '3' / 'surgery_report.json').read_text())


def stored(item_dir) -> dict:
  """What Orbax's files say of each array: `_METADATA`, `_sharding`, each process's
  `array_metadatas/` entries and the zarr headers in the OCDBT database."""
  database = ts.KvStore.open({'driver': 'ocdbt', 'base': paths.kvstore(item_dir)}).result()
  headers = {key.decode(): json.loads(database.read(key).result().value)
             for key in database.list().result() if key.endswith(b'/.zarray')}
  arrays = {f.name: sorted(json.dumps(m, sort_keys=True) for m in json.loads(f.read_text())['array_metadatas'])
            for f in sorted((item_dir / 'array_metadatas').glob('process_*'))}
  return {'metadata': json.loads((item_dir / '_METADATA').read_text()),
          'sharding': json.loads((item_dir / '_sharding').read_text()),
          'arrays': arrays, 'headers': headers}


def seen_by_orbax(item_dir):
  """Orbax's metadata of each leaf: shape, dtype, saved sharding."""
  return jax.tree.map(lambda m: (m.shape, str(m.dtype), repr(m.sharding)),
                      ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree,
                      is_leaf=lambda m: hasattr(m, 'shape'))


def assert_same_checkpoint(copied, decoded) -> None:
  """`copied` holds what `decoded` holds, file entries, metadata and bits."""
  assert stored(copied) == stored(decoded)
  assert seen_by_orbax(copied) == seen_by_orbax(decoded)
  got, want = (checkpoints.flat_numpy(checkpoints.restore_plain(d)) for d in (copied, decoded))
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key


def test_a_rename_copies_its_sharded_leaves_as_stored_chunks(trained, tmp_path, capsys):
  in_path = trained
  report = run(in_path, tmp_path / 'copied')
  assert report['copied_as_stored_chunks'] == COPIED
  assert not set(COPIED) & {k for g in report['groups'] for k in g['outputs']}
  assert run(in_path, tmp_path / 'decoded', copy=False)['copied_as_stored_chunks'] == []
  assert_same_checkpoint(tmp_path / 'copied' / '3' / 'default', tmp_path / 'decoded' / '3' / 'default')
  config = write_config(tmp_path, {'transforms': RENAME})
  assert diff.main([str(in_path), str(tmp_path / 'copied'), '--values', '--map', str(config)]) == 0
  capsys.readouterr()
  printed = []
  for name in ('copied', 'decoded'):
    assert inspect.main([str(tmp_path / name)]) == 0
    printed.append(capsys.readouterr().out.replace(str(tmp_path / name), 'OUT'))
  assert printed[0] == printed[1]


def test_two_processes_copy_their_shares_into_one_checkpoint(trained, tmp_path):
  in_path = trained
  config = write_config(tmp_path, {'transforms': RENAME})
  ok(launch(2, f'--config={config}', f'--config.input.path={in_path}',
            f'--config.output.path={tmp_path / "copied"}', log_dir=tmp_path / 'logs'))
  ok(launch(2, f'--config={config}', f'--config.input.path={in_path}',
            f'--config.output.path={tmp_path / "decoded"}', '--config.output.copy_stored_chunks=False',
            log_dir=tmp_path / 'logs_decoded'))
  copied = tmp_path / 'copied' / '3' / 'default'
  assert {p.name for p in copied.glob('ocdbt.copied_*')} == {'ocdbt.copied_0', 'ocdbt.copied_1'}
  assert json.loads((tmp_path / 'copied' / '3' / 'surgery_report.json').read_text())[
      'copied_as_stored_chunks'] == COPIED
  assert_same_checkpoint(copied, tmp_path / 'decoded' / '3' / 'default')


def test_a_copied_chunk_that_differs_on_disk_fails_validation(tmp_path, monkeypatch):
  # Chunks of 32 KiB: OCDBT keeps them in its data files (small ones go inline in its tree).
  float32_checkpoint(tmp_path / 'in', leaves=2, rows=64)

  def flip_copied_bytes(step_dir):
    for data in step_dir.glob('*/ocdbt.copied_0/d/*'):
      data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
  monkeypatch.setattr(faults, 'corrupt_output', flip_copied_bytes)
  with pytest.raises(job.BadStagedOutput, match=r"validation failed: 2 leaves copied as stored "
                     r"chunks differ on disk, first 'params/layer_0/kernel'"):
    outcome({'transforms': [dict(op='rename', pattern=r'(.*)/w', replacement=r'\1/kernel')],
             'input': {'path': str(tmp_path / 'in')}, 'output': {'path': str(tmp_path / 'out')}})


def test_a_run_stopped_while_copying_is_done_again_by_the_next(trained, tmp_path, monkeypatch):
  # Stopped with its chunks written beside the finalized groups and not merged: the next run
  # writes the output again, and it holds what the decode-encode path writes.
  monkeypatch.setenv(faults.FAULT, 'copying')
  with pytest.raises(faults.InjectedFault):
    run(trained, tmp_path / 'copied')
  monkeypatch.delenv(faults.FAULT)
  assert run(trained, tmp_path / 'copied')['copied_as_stored_chunks'] == COPIED
  run(trained, tmp_path / 'decoded', copy=False)
  assert_same_checkpoint(tmp_path / 'copied' / '3' / 'default', tmp_path / 'decoded' / '3' / 'default')


def test_chunks_are_copied_in_batches_of_a_third_of_the_budget():
  # A copy holds about three batches at once; none passes a third of the budget but a lone chunk.
  leaf = stored_chunks.Copy('', 'a', '', 'a', 'a', (), (4,), 10, '')
  chunks = [('a', f'a/{i}', f'a/{i}') for i in range(7)]

  def batch_sizes(budget_bytes):
    return [len(batch) for batch in stored_chunks._batches(chunks, {'a': leaf}, budget_bytes)]
  assert batch_sizes(90) == [3, 3, 1]
  assert batch_sizes(20) == [1] * 7
  assert batch_sizes(None) == [7]
