"""Inputs the job must read right or refuse by name: which step is the latest committed one,
zero-padded step folders, int4 and string leaves, a symlinked input, damaged data files and a
`_METADATA` that lost an entry. Refusals found before any data moves run in this process through
`job.run` (a SurgeryError is exit 2 on the command line); runs that move data run the command."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import checkpoints
from jobs import ok, run_job, write_config
from surgery_job import checkpoint, cli, config as config_lib, inspect, job, validate
from surgery_job.errors import SurgeryError
from test_bad_input import assert_bad_input

SMALL = {'params': {'w': np.arange(32, dtype=np.float32).reshape(4, 8), 'b': np.ones(8, np.float32)}}


@pytest.fixture(autouse=True)
def keep_x64_off():
  """job.run turns on 64-bit JAX for the process; other tests in this process expect it off."""
  yield
  jax.config.update('jax_enable_x64', False)


def run(in_path, out_path=None, **fields) -> list[dict]:
  config = {'input': {'path': str(in_path)}, 'output': {'path': str(out_path) if out_path else None},
            **fields}
  return job.run(config_lib.with_defaults(ml_collections.ConfigDict(config)))


def run_command(tmp_path, in_path, out_path, **fields):
  """The job as users run it; the process's result."""
  return run_job(write_config(tmp_path, fields), f'--config.input.path={in_path}',
                 f'--config.output.path={out_path}')


def save(path, state, step=3, **options) -> None:
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(**options)) as manager:
    manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
    manager.wait_until_finished()


# Item 8: input.step='latest' is the latest committed step; an uncommitted one is refused by name.

@pytest.fixture
def steps(layered, tmp_path):
  """Step 3 committed; newer step folders that are not: empty, an item without _METADATA, an Orbax
  temporary folder, and a full copy without commit_success.txt."""
  root = tmp_path / 'ckpt'
  shutil.copytree(layered[0], root)
  (root / '4').mkdir()
  (root / '5' / 'default').mkdir(parents=True)
  shutil.copytree(root / '3', root / '6.orbax-checkpoint-tmp-1234')
  shutil.copytree(root / '3', root / '7')
  (root / '7' / 'commit_success.txt').unlink()
  return root


def test_latest_is_the_latest_committed_step(steps):
  assert checkpoint.locate(str(steps), 'latest', None).step == 3
  assert checkpoint.locate(str(steps), None, None).item_dir == steps / '3' / 'default'


@pytest.mark.parametrize('step, why', [(4, 'holds no checkpoint item'),
                                       (5, 'holds no checkpoint item'),
                                       (6, 'is an unfinished Orbax save'),
                                       (7, 'has no commit_success.txt')])
def test_an_uncommitted_step_is_refused(steps, step, why):
  with pytest.raises(SurgeryError, match=f'input.step {step} is not a committed checkpoint: .* {why}'):
    checkpoint.locate(str(steps), step, None)


def test_no_committed_step_at_all(tmp_path):
  (tmp_path / 'ckpt' / '4').mkdir(parents=True)
  with pytest.raises(SurgeryError, match='holds no committed step'):
    checkpoint.locate(str(tmp_path / 'ckpt'), 'latest', None)


def test_negative_output_step_is_refused(layered, tmp_path):
  with pytest.raises(SurgeryError, match='output.step must be a step number'):
    run(layered[0], tmp_path / 'out', output={'path': str(tmp_path / 'out'), 'step': -5})
  assert not (tmp_path / 'out').exists()


def test_a_symlinked_input_is_the_same_surgery(layered, tmp_path):
  link = tmp_path / 'link'
  link.symlink_to(layered[0])
  transforms = [dict(op='scale', pattern='head/bias', factor=2.0)]
  ok(run_command(tmp_path, layered[0], tmp_path / 'out', transforms=transforms))
  report_file = tmp_path / 'out' / '3' / 'surgery_report.json'
  written = report_file.read_text()
  again = run_command(tmp_path, link, tmp_path / 'out', transforms=transforms)
  ok(again)
  assert 'Already done' in again.stderr
  assert report_file.read_text() == written


# Item 7: zero-padded step folders, leaves Orbax stores that the job cannot carry, dry run alone.

def test_zero_padded_step_folders_are_read(tmp_path):
  save(tmp_path / 'ckpt', SMALL, step_format_fixed_length=4)
  assert [p.name for p in (tmp_path / 'ckpt').iterdir()] == ['0003']
  ok(run_command(tmp_path, tmp_path / 'ckpt', tmp_path / 'out', input={'step': 3}))
  restored = checkpoints.flat_numpy(checkpoints.restore_plain(tmp_path / 'out' / '3' / 'default'))
  np.testing.assert_array_equal(restored['params/w'], SMALL['params']['w'])


def test_int4_leaves_pass_through(tmp_path):
  q = np.arange(32).reshape(4, 8) % 8 - 4
  save(tmp_path / 'ckpt', {'params': {'w': jnp.ones((4, 8)), 'q': jnp.asarray(q, jnp.int4)}})
  ok(run_command(tmp_path, tmp_path / 'ckpt', tmp_path / 'out'))
  same = checkpoints.flat_numpy(checkpoints.restore_plain(tmp_path / 'out' / '3' / 'default'))
  assert same['params/q'].dtype == jnp.int4
  np.testing.assert_array_equal(same['params/q'].astype(np.int8), q)
  # Dequantized by a cast: exact in float32, so the cast loses nothing.
  ok(run_command(tmp_path, tmp_path / 'ckpt', tmp_path / 'cast',
                 transforms=[dict(op='cast', pattern='q', dtype='float32')]))
  cast = checkpoints.flat_numpy(checkpoints.restore_plain(tmp_path / 'cast' / '3' / 'default'))
  np.testing.assert_array_equal(cast['params/q'], q.astype(np.float32))
  report = json.loads((tmp_path / 'cast' / '3' / 'surgery_report.json').read_text())
  assert report['cast_errors']['params/q']['max_abs_error'] == 0


def test_string_leaves_are_refused_by_name(tmp_path):
  (tmp_path / 'ckpt' / '3').mkdir(parents=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(tmp_path / 'ckpt' / '3' / 'default'), {**SMALL, 'name': 'run-7'})
  with pytest.raises(SurgeryError, match="leaf 'name' of .* is a StringMetadata, not an array"):
    run(tmp_path / 'ckpt', tmp_path / 'out')
  assert not list(tmp_path.glob('out*'))


def test_dry_run_needs_no_output_path(layered, capsys):
  assert run(layered[0], dry_run=True) == []
  assert f'Surgery plan: {layered[0] / "3" / "default"} -> no output.path' in capsys.readouterr().out


# Item 9: damage named before any data moves, or when read.

@pytest.fixture(scope='module')
def spilled(tmp_path_factory):
  """A checkpoint whose large array is kept in a data file under ocdbt.process_0/d/ (small values
  live inside the B+tree), and that file."""
  root = tmp_path_factory.mktemp('spilled') / 'ckpt'
  save(root, {'params': {'big': np.arange(1 << 16, dtype=np.float32), **SMALL['params']}})
  data_file = max((root / '3' / 'default').glob('ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)
  return root, data_file


def damaged(spilled, tmp_path, damage):
  """A copy of `spilled` with `damage(data file)` done to it; returns the copy and the file."""
  root, data_file = spilled
  copy = tmp_path / 'damaged'
  shutil.copytree(root, copy)
  copied_file = copy / data_file.relative_to(root)
  damage(copied_file)
  return copy, copied_file


def _truncate(path):
  path.write_bytes(path.read_bytes()[:1000])


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  data[100:2000] = bytes(b ^ 0xFF for b in data[100:2000])
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage, text', [
    (lambda p: p.unlink(), '{} is missing (it holds array \'params.big\')'),
    (_truncate, '{} is truncated: 1000 bytes, array \'params.big\' needs'),
])
def test_a_damaged_data_file_is_named_before_any_data_moves(spilled, tmp_path, damage, text):
  copy, data_file = damaged(spilled, tmp_path, damage)
  with pytest.raises(SurgeryError) as error:
    run(copy, tmp_path / 'out')
  assert f'checkpoint file {text.format(data_file)}' in str(error.value)
  assert not list(tmp_path.glob('out*'))


def test_corrupt_data_is_named_when_read(spilled, tmp_path):
  copy, data_file = damaged(spilled, tmp_path, _flip_bytes)
  result = run_command(tmp_path, copy, tmp_path / 'out')
  assert_bad_input(result, f"checkpoint file {data_file} is damaged (it holds array 'params.big': ")
  assert '<bound method' not in result.stderr and 'TensorStore details' not in result.stderr
  assert not list(tmp_path.glob('out*'))  # Found only once reading began: what was staged went.


def test_a_metadata_entry_removed_is_refused(layered, tmp_path):
  copy = tmp_path / 'ckpt'
  shutil.copytree(layered[0], copy)
  metadata_file = copy / '3' / 'default' / '_METADATA'
  metadata = json.loads(metadata_file.read_text())
  del metadata['tree_metadata']["('params', 'head', 'bias')"]
  metadata_file.write_text(json.dumps(metadata))
  with pytest.raises(SurgeryError, match="_METADATA: it does not list the stored array 'params.head.bias'"):
    run(copy, tmp_path / 'out')
  assert not list(tmp_path.glob('out*'))


# Item 10: a wide tree costs one small program per kind of leaf, not one per tree.

def test_digests_compile_once_per_kind_of_leaf():
  arrays = {f'w{i}': jnp.full((4,), i, jnp.float32) for i in range(300)}
  arrays['m'] = jnp.ones((3, 5), jnp.bfloat16)
  before = validate._digest_batch._cache_size()  # pylint: disable=protected-access
  sums = validate.digests(arrays)
  assert validate._digest_batch._cache_size() - before <= 2  # pylint: disable=protected-access
  assert sums.keys() == arrays.keys()
  assert sums['w7'][:2] == ((4,), 'float32') and sums['m'][:2] == ((3, 5), 'bfloat16')
  assert sums['w7'] != sums['w8']



def test_digests_of_small_and_large_leaves_are_the_position_weighted_sums():
  mesh = checkpoints.mesh_2x4()
  P = jax.sharding.PartitionSpec
  # Below and above validate.SMALL elements; rows sharded or not, one axis.
  for shape, spec in (((16, 12), P('data', 'model')), ((70000, 4, 2), P('data', 'model')),
                      ((5000, 40), P(None, 'data')), ((2**17,), P('model'))):
    values = np.random.default_rng(0).integers(0, 2**32, shape, dtype=np.uint32)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    array = jax.device_put(values, sharding)
    bits = values.astype(np.uint64).ravel()
    weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
    assert validate.digests({'k': array})['k'][2] == (int(bits.sum() % 2**32),
                                                      int((bits * weights % 2**32).sum() % 2**32))


def test_small_leaves_read_whole_and_large_ones_by_shard_restore_onto_their_shardings(tmp_path):
  mesh = checkpoints.mesh_2x4()
  P = jax.sharding.PartitionSpec
  rng = np.random.default_rng(0)
  values = {'small': rng.standard_normal((64, 32)).astype(np.float32),  # 8 KiB: read whole
            'bf16': rng.standard_normal((16, 8)).astype(jnp.bfloat16),
            'large': rng.standard_normal((1024, 512)).astype(np.float32)}  # 2 MiB: by shard
  specs = {'small': P('data', 'model'), 'bf16': P(None, 'model'), 'large': P('model', 'data')}
  targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(mesh, specs[k]))
             for k, v in values.items()}
  assert [k for k, x in targets.items() if checkpoint.whole_bytes(x)] == ['small', 'bf16']
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(tmp_path / 'ckpt'), {k: jax.device_put(v, targets[k].sharding)
                                                      for k, v in values.items()})
  restored = checkpoint.restore({'': epath.Path(tmp_path / 'ckpt')}, values, targets)
  for key, value in values.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert restored[key].sharding.spec == specs[key] and restored[key].dtype == value.dtype


# Issue 19, items 6, 19, 20: keys that hold '/', keys that join alike, subtrees without leaves.

HAIKU = {'mlp/~/linear_0': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                            'b': np.ones(4, np.float32)},
         'mlp/~/linear_1': {'w': np.full((4, 2), 3, np.float32)}}
STREAMED = {'memory': {'host_budget_gb': 1e-7}}  # A group per leaf or two: partial saves.


def plain_restore(root, step: int = 3):
  """Step `step` of `root` as a plain CheckpointManager restores it, on one device."""
  with ocp.CheckpointManager(root) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore())


def test_keys_holding_a_slash_keep_their_tree(tmp_path):
  state = checkpoints.train_state(HAIKU)
  save(tmp_path / 'ckpt', state)
  ok(run_command(tmp_path, tmp_path / 'ckpt', tmp_path / 'out', **STREAMED,
                 transforms=[dict(op='scale', pattern='mlp/~/linear_0/w', factor=2.0)]))
  got, want = plain_restore(tmp_path / 'out'), plain_restore(tmp_path / 'ckpt')
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert sorted(got['params']) == ['mlp/~/linear_0', 'mlp/~/linear_1']
  np.testing.assert_array_equal(got['params']['mlp/~/linear_0']['w'],
                                2 * np.asarray(want['params']['mlp/~/linear_0']['w']))
  for key, value in checkpoints.flat_numpy(want).items():
    if key != 'params/mlp/~/linear_0/w':
      np.testing.assert_array_equal(checkpoints.flat_numpy(got)[key], value, err_msg=key)


def test_keys_that_join_alike_are_refused_naming_both(tmp_path):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(tmp_path / 'ckpt'),
                      {'params': {'a/b': np.ones(2, np.float32), 'a': {'b': np.zeros(2, np.float32)}}})
  with pytest.raises(SurgeryError) as error:
    run(tmp_path / 'ckpt', tmp_path / 'out')
  assert str(error.value) == (
      f"{tmp_path / 'ckpt'}: keys ['params']['a']['b'] and ['params']['a/b'] both read as "
      "'params/a/b': the job names leaves by their '/'-joined path and would keep only one; rename one")
  assert not list(tmp_path.glob('out*'))


def test_subtrees_without_leaves_are_kept(tmp_path):
  state = {'params': {'w': np.ones((2, 3), np.float32), 'n': None, 'e': {}},
           'opt': [{'mu': np.ones(3, np.float32)}, None]}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(tmp_path / 'ckpt'), state)
  ok(run_command(tmp_path, tmp_path / 'ckpt', tmp_path / 'out', **STREAMED))
  with ocp.StandardCheckpointer() as checkpointer:
    got = checkpointer.restore(epath.Path(tmp_path / 'out'))
  assert jax.tree.structure(got) == jax.tree.structure(state)
  np.testing.assert_array_equal(got['params']['w'], state['params']['w'])


@pytest.mark.parametrize('text, why', [('{}', "it has no 'tree_metadata' object"),
                                       ('[1, 2, 3]', 'it holds a JSON list, not an object')])
def test_metadata_of_another_shape_is_named(layered, tmp_path, capsys, text, why):
  copy = tmp_path / 'ckpt'
  shutil.copytree(layered[0], copy)
  metadata_file = copy / '3' / 'default' / '_METADATA'
  metadata_file.write_text(text)
  expected = f'damaged checkpoint metadata file {metadata_file}: {why}'
  with pytest.raises(SurgeryError) as error:
    run(copy, tmp_path / 'out')
  assert str(error.value) == expected
  assert cli.run(inspect.PROG, inspect.main, [str(copy)]) == 2
  assert capsys.readouterr().err == f'{inspect.PROG}: error: {expected}\n'


def test_a_tree_too_deep_for_orbax_is_one_line(tmp_path):
  deep = np.ones(2, np.float32)
  for _ in range(400):
    deep = {'k': deep}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(epath.Path(tmp_path / 'ckpt'), {'params': deep})
  with pytest.raises(SurgeryError) as error:
    run(tmp_path / 'ckpt', tmp_path / 'out')
  assert str(error.value) == (f'cannot read the checkpoint in {tmp_path / "ckpt"}: its tree is '
                              "nested 401 levels deep, more than Orbax's reader can take")
