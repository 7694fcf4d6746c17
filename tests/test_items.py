"""A step with several items, as a training loop writes it through `ocp.args.Composite`: two PyTree
items (`params`; `train` with the optax state, the step and an rng key) planned together as one
tree, and a JSON item copied byte for byte. The training code then resumes from the output."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from jobs import REPO, ok, run_job, write_config

TX = optax.adam(1e-2)
META = {'run': 'r7', 'vocab': checkpoints.VOCAB}


def scanned_params() -> dict:
  """The layered params with their layers stacked on axis 0, as a scanned model holds them."""
  params = checkpoints.layered_params()
  layers = [params.pop(f'layers_{i}') for i in range(checkpoints.LAYERS)]
  params['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return params


def grads_of(params):
  return jax.tree.map(lambda p: jnp.sin(p) + 0.25, params)


def train_step(params, opt_state):
  updates, opt_state = TX.update(grads_of(params), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def sharded(params) -> dict:
  """The params on the 2x4 mesh: the layered specs, with the layer axis of stacked leaves unsharded."""
  mesh = checkpoints.mesh_2x4()

  def place(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    spec = checkpoints.saved_spec(key)
    return jax.device_put(x, NamedSharding(mesh, P(None, *spec) if key.startswith('layers/') else spec))
  return jax.tree_util.tree_map_with_path(place, params)


def save(path, params, train) -> None:
  with ocp.CheckpointManager(path) as manager:
    manager.save(3, args=ocp.args.Composite(
        params=ocp.args.StandardSave(sharded(params)),
        train=ocp.args.StandardSave(train),
        metadata=ocp.args.JsonSave(META)))
    manager.wait_until_finished()


@pytest.fixture(scope='module')
def composite(tmp_path_factory):
  """The step on disk, and the numpy state it holds."""
  params = jax.tree.map(jnp.asarray, scanned_params())
  params, opt_state = train_step(params, TX.init(params))
  train = {'opt_state': opt_state, 'step': jnp.asarray(3, jnp.int32), 'rng': jax.random.key(7)}
  path = tmp_path_factory.mktemp('composite') / 'ckpt'
  save(path, params, train)
  return path, params, train


def restore_items(out, params_target, train_target) -> dict:
  """The output step read back as the training loop reads it: plain Orbax, its own targets."""
  with ocp.CheckpointManager(out) as manager:
    assert manager.all_steps() == [3]
    restored = manager.restore(3, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params_target), train=ocp.args.StandardRestore(train_target),
        metadata=ocp.args.JsonRestore()))
  assert restored['metadata'] == META
  return restored


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_tree_equal(got, want) -> None:
  got_flat, want_flat = checkpoints.flat_numpy(jax.tree.map(keys_as_data, got)), checkpoints.flat_numpy(
      jax.tree.map(keys_as_data, want))
  assert sorted(got_flat) == sorted(want_flat)
  for key, value in want_flat.items():
    np.testing.assert_array_equal(got_flat[key], value, err_msg=key)


def keys_as_data(x):
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def run(tmp_path, in_path, transforms):
  out = tmp_path / 'out'
  ok(run_job(write_config(tmp_path, {'transforms': transforms}), f'--config.input.path={in_path}',
             f'--config.output.path={out}'))
  return out


def test_identity_keeps_every_item(composite, tmp_path):
  in_path, params, train = composite
  out = run(tmp_path, in_path, [])
  assert sorted(p.name for p in (out / '3').iterdir()) == [
      '_CHECKPOINT_METADATA', 'commit_success.txt', 'metadata', 'params', 'surgery_report.json', 'train']
  for file in (in_path / '3' / 'metadata').iterdir():
    assert (out / '3' / 'metadata' / file.name).read_bytes() == file.read_bytes()
  restored = restore_items(out, abstract(params), abstract(train))
  assert_tree_equal(restored['params'], params)
  assert_tree_equal(restored['train'], train)
  assert jax.random.key_impl(restored['train']['rng']) == jax.random.key_impl(train['rng'])


def test_reset_optimizer_reaches_the_moments_in_the_other_item(composite, tmp_path):
  in_path, params, train = composite
  out = run(tmp_path, in_path, [dict(op='reset_optimizer', pattern='head/.*')])
  restored = restore_items(out, abstract(params), abstract(train))
  adam = restored['train']['opt_state'][0]
  for moments, old in ((adam.mu, train['opt_state'][0].mu), (adam.nu, train['opt_state'][0].nu)):
    assert not np.any(np.asarray(moments['head']['kernel']))
    np.testing.assert_array_equal(np.asarray(moments['embed']['embedding']), np.asarray(old['embed']['embedding']))
  assert_tree_equal(restored['params'], params)


def test_vocab_resize_pads_params_and_moments(composite, tmp_path):
  in_path, params, train = composite
  out = run(tmp_path, in_path, [dict(op='pad', pattern='embed/embedding', axis=0, size=24, init='mean')])
  new_params = {**params, 'embed': {'embedding': jnp.zeros((24, checkpoints.D))}}
  restored = restore_items(out, abstract(new_params), abstract({**train, 'opt_state': TX.init(new_params)}))
  embedding = np.asarray(restored['params']['embed']['embedding'])
  old = np.asarray(params['embed']['embedding'])
  np.testing.assert_array_equal(embedding[:checkpoints.VOCAB], old)
  np.testing.assert_allclose(embedding[checkpoints.VOCAB:], np.broadcast_to(old.mean(0), (8, checkpoints.D)),
                             rtol=1e-6)
  mu = np.asarray(restored['train']['opt_state'][0].mu['embed']['embedding'])
  np.testing.assert_array_equal(mu[:checkpoints.VOCAB], np.asarray(train['opt_state'][0].mu['embed']['embedding']))
  assert not np.any(mu[checkpoints.VOCAB:])


def test_unscan_then_the_unscanned_trainer_resumes(composite, tmp_path):
  in_path, params, train = composite
  out = run(tmp_path, in_path, [dict(op='unstack', pattern=r'layers/(.*)', replacement=r'layers_{i}/\1')])

  def unscanned(tree):
    tree = dict(tree)
    layers = tree.pop('layers')
    for i in range(checkpoints.LAYERS):
      tree[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], layers)
    return tree
  want_params = unscanned(params)
  adam = train['opt_state'][0]
  want_opt = (adam._replace(mu=unscanned(adam.mu), nu=unscanned(adam.nu)), train['opt_state'][1])
  restored = restore_items(out, abstract(want_params),
                           abstract({**train, 'opt_state': TX.init(want_params)}))
  assert_tree_equal(restored['params'], want_params)
  assert_tree_equal(restored['train']['opt_state'], want_opt)
  # One more training step from the converted state is the step from the unscanned original.
  got = train_step(restored['params'], restored['train']['opt_state'])
  want = train_step(jax.tree.map(jnp.asarray, want_params), want_opt)
  assert_tree_equal(got, want)


def test_one_item_still_picks_that_item(composite, tmp_path):
  in_path, params, _ = composite
  out = tmp_path / 'out'
  ok(run_job(REPO / 'configs' / 'identity.py', f'--config.input.path={in_path}',
             f'--config.output.path={out}', '--config.input.item=params'))
  assert sorted(p.name for p in (out / '3').iterdir() if p.is_dir()) == ['params']
  assert json.loads((out / '3' / '_CHECKPOINT_METADATA').read_text())['item_handlers'] == {
      'params': 'orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler'}
  assert_tree_equal(checkpoints.restore_plain(out / '3' / 'params'), params)
