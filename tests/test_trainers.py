"""Checkpoints as trainers write them: a Flax NNX model with dropout rngs and an `nnx.Optimizer`
(optax adamw) saved as the NNX checkpointing guide does, a MaxText-like tree, and leaves of every
dtype. Outputs are compared leaf by leaf with plain Orbax (PRNG keys by key data and key dtype), and
the NNX trainer restores each into its own abstract state and trains one more step."""

import json
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import checkpoints
import nnx_trainer
from jobs import REPO, ok, run_job, surgery
from test_bad_input import assert_bad_input

STEP = 2
RNG_KEY = 'model/blocks/dropout/rngs/key/value'


@pytest.fixture(scope='module')
def scanned(tmp_path_factory):
  """A CheckpointManager dir (step 2) of the scanned NNX trainer's state after two steps, on 2x4."""
  path = tmp_path_factory.mktemp('nnx') / 'ckpt'
  state = nnx_trainer.trained(checkpoints.mesh_2x4())
  checkpoints.save_manager(path, state, step=STEP)
  return path, checkpoints.flat_numpy(state)


def written(out):
  """The output's item folder, its leaves restored with plain Orbax, and its typed keys' dtypes."""
  item_dir = out / str(STEP) / 'default'
  restored = checkpoints.restore_plain(item_dir)
  return item_dir, checkpoints.flat_numpy(restored), checkpoints.key_dtypes(restored)


def resumes(item_dir, **model) -> dict:
  """The trainer restores the output and trains on; returns what it restored, as numpy."""
  restored, loss = nnx_trainer.resume(item_dir, checkpoints.mesh_2x4(), **model)
  assert np.isfinite(loss)
  return checkpoints.flat_numpy(restored)


def assert_same(got: dict, want: dict, keys) -> None:
  for key in keys:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_identity_keeps_every_leaf_and_the_rng_keys(scanned, tmp_path):
  in_path, x = scanned
  out = tmp_path / 'out'
  ok(run_job(REPO / 'configs' / 'identity.py', f'--config.input.path={in_path}',
             f'--config.output.path={out}'))
  item_dir, got, key_dtypes = written(out)
  assert sorted(got) == sorted(x)
  assert_same(got, x, x)
  assert key_dtypes == {RNG_KEY: 'key<urbg>'}
  # The trainer restores the sharded leaves copied as their stored chunks as it restores its own.
  copied = json.loads((out / str(STEP) / 'surgery_report.json').read_text())['copied_as_stored_chunks']
  assert 'model/blocks/linear/kernel/value' in copied, copied
  assert_same(resumes(item_dir), x, x)


def test_reset_optimizer_streamed_in_groups(scanned, tmp_path):
  in_path, x = scanned
  out, result = surgery(tmp_path, in_path, [dict(op='reset_optimizer', pattern='head/.*')],
                        params_root='model', memory={'host_budget_gb': 4e-6})
  ok(result)
  assert int(re.search(r'Group 1/(\d+) done', result.stderr).group(1)) > 1
  item_dir, got, _ = written(out)
  moments = [k for k in x if '/mu/head/' in k or '/nu/head/' in k]
  assert len(moments) == 4 and not any(np.any(got[k]) for k in moments)
  assert_same(got, x, [k for k in x if k not in moments])
  resumes(item_dir)


def test_vocab_resize(scanned, tmp_path):
  in_path, x = scanned
  out, result = surgery(tmp_path, in_path, [
      dict(op='pad', pattern='embed/embedding/value', axis=0, size=24, init='mean'),
      dict(op='pad', pattern='head/kernel/value', axis=1, size=24),
      dict(op='pad', pattern='head/bias/value', axis=0, size=24)], params_root='model')
  ok(result)
  item_dir, got, _ = written(out)
  embedding = x['model/embed/embedding/value']
  np.testing.assert_array_equal(got['model/embed/embedding/value'][:16], embedding)
  np.testing.assert_allclose(got['model/embed/embedding/value'][16:],
                             np.broadcast_to(embedding.mean(0), (8, 8)), rtol=1e-6)
  np.testing.assert_array_equal(got['model/head/kernel/value'],
                                np.pad(x['model/head/kernel/value'], ((0, 0), (0, 8))))
  for moment in ('mu', 'nu'):
    key = f'optimizer/opt_state/0/{moment}/embed/embedding/value'
    np.testing.assert_array_equal(got[key], np.pad(x[key], ((0, 8), (0, 0))))
  assert_same(got, x, [k for k in x if 'embed' not in k and 'head' not in k])
  assert resumes(item_dir, vocab=24)['model/head/bias/value'].shape == (24,)


def test_unscan_into_the_unscanned_trainer(scanned, tmp_path):
  in_path, x = scanned
  out, result = surgery(tmp_path, in_path, [
      dict(op='unstack', pattern='blocks/(.*)', replacement=r'blocks/{i}/\1', count=3)],
      params_root='model')
  ok(result)
  item_dir, got, key_dtypes = written(out)
  assert key_dtypes == {RNG_KEY.replace('blocks/', f'blocks/{i}/'): 'key<urbg>' for i in range(3)}
  stacked = [k for k in x if '/blocks/' in k]
  assert len(stacked) == 8
  for key in stacked:
    for i in range(3):
      np.testing.assert_array_equal(got[key.replace('/blocks/', f'/blocks/{i}/')], x[key][i], err_msg=key)
  assert_same(got, x, [k for k in x if k not in stacked])
  restored = resumes(item_dir, scanned=False)
  np.testing.assert_array_equal(restored['model/blocks/1/dropout/rngs/key/value'], x[RNG_KEY][1])


def test_cast_of_an_rng_key_is_a_one_line_error(scanned, tmp_path):
  in_path, _ = scanned
  out, result = surgery(tmp_path, in_path, [dict(op='cast', pattern='.*', dtype='bfloat16')],
                        params_root='model')
  assert_bad_input(result, f"op 0 (cast): cast of '{RNG_KEY.removeprefix('model/')}': it is a PRNG "
                           'key (key<urbg>)')
  assert not out.exists()


def maxtext_like_state() -> dict:
  """params/params/..., Adam moments mirroring them, step, and nnx_aux with a typed rbg key."""
  state = checkpoints.train_state({'params': checkpoints.layered_params()})
  state['nnx_aux'] = {'rngs': {'dropout': {'key': jax.random.key(5, impl='rbg'),
                                           'count': jax.numpy.asarray(7, jax.numpy.uint32)}}}
  return checkpoints.shard(state, checkpoints.mesh_2x4())


def test_full_key_ops_reach_outside_the_params(tmp_path):
  state = maxtext_like_state()
  checkpoints.save_manager(tmp_path / 'in', state, step=STEP)
  x = checkpoints.flat_numpy(state)
  out, result = surgery(tmp_path, tmp_path / 'in', [
      dict(op='rename', pattern='/nnx_aux/(.*)', replacement=r'/aux/\1'),
      dict(op='rename', pattern='/params/params/(.*)', replacement=r'/params/\1')])
  ok(result)
  _, got, key_dtypes = written(out)
  moved = {k.replace('nnx_aux/', 'aux/').replace('params/params/', 'params/').replace(
      'mu/params/', 'mu/').replace('nu/params/', 'nu/'): k for k in x}
  assert sorted(got) == sorted(moved) and key_dtypes == {'aux/rngs/dropout/key': 'key<rbg>'}
  for new, old in moved.items():
    np.testing.assert_array_equal(got[new], x[old], err_msg=new)
  # The moments still mirror the params: optax's state of the new params has the output's keys.
  params = {k.removeprefix('params/'): v for k, v in got.items() if k.startswith('params/')}
  opt_state = jax.eval_shape(optax.adam(1e-2).init, traverse_util.unflatten_dict(params, sep='/'))
  assert sorted('opt_state/' + k for k in checkpoints.flat_numpy(opt_state)) == sorted(
      k for k in got if k.startswith('opt_state/'))

  serving = tmp_path / 'serving'
  serving.mkdir()
  out, result = surgery(serving, tmp_path / 'in', [
      dict(op='drop', pattern='/nnx_aux/.*'), dict(op='drop_optimizer'),
      dict(op='rename', pattern='/params/params/(.*)', replacement=r'/\1')])
  ok(result)
  _, got, _ = written(out)
  kept = {k.removeprefix('params/params/'): k for k in x if k.startswith('params/') or k == 'step'}
  assert sorted(got) == sorted(kept)
  for new, old in kept.items():
    np.testing.assert_array_equal(got[new], x[old], err_msg=new)


def raw_leaves(path) -> dict[str, np.ndarray]:
  """Every leaf as the numpy array of its stored bits (typed keys: their key data)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(path).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {k: np.asarray(v) for k, v in checkpoints.flat_numpy(restored).items()}


def test_every_dtype_passes_through_bit_for_bit(tmp_path):
  rng = np.random.default_rng(0)
  state = {
      'params': {'w': jax.numpy.ones((4, 8))},
      'bool': jax.numpy.asarray(rng.random(6) > 0.5), 'int8': jax.numpy.asarray([-128, 0, 127], np.int8),
      'uint16': jax.numpy.asarray([0, 65535], np.uint16), 'int32': jax.numpy.asarray(-7, np.int32),
      'uint32': jax.numpy.asarray(rng.integers(0, 2**32, (3, 2)), np.uint32),
      'float16': jax.numpy.asarray([np.nan, -0.0, 1.5], np.float16),
      'bfloat16': jax.numpy.asarray([np.inf, -0.0], jax.numpy.bfloat16),
      'complex64': jax.numpy.asarray([1 + 2j], np.complex64),
      'int64': np.asarray([2**40 + 1, -3], np.int64), 'float64': np.asarray([1 / 3], np.float64),
      'python_int': 2**40 + 1, 'python_float': 1 / 3, 'numpy_scalar': np.int32(-3),
      'threefry': jax.random.key(1), 'rbg': jax.random.key(2, impl='rbg'),
      'unsafe_rbg': jax.random.split(jax.random.key(3, impl='unsafe_rbg'), 4),
      'raw_key': jax.random.PRNGKey(4),
  }
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'in', state)
  out = tmp_path / 'out'
  ok(run_job(REPO / 'configs' / 'identity.py', f'--config.input.path={tmp_path / "in"}',
             f'--config.output.path={out}'))
  want, got = raw_leaves(tmp_path / 'in'), raw_leaves(out)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
  restored = ocp.StandardCheckpointer().restore(out, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if checkpoints.is_key(x) else None, state))
  assert checkpoints.key_dtypes(restored) == {'threefry': 'key<fry>', 'rbg': 'key<rbg>',
                                              'unsafe_rbg': 'key<urbg>'}
