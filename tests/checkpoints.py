"""Test checkpoints written with plain Flax, optax and Orbax, and the numpy views tests compare against."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

LAYERS = 3
D, VOCAB, HEADS_OUT = 8, 16, 12

# Saved specs on the ('data', 'model') 2x4 mesh; the rest is replicated.
SPECS = {
    'embed/embedding': P('model', None),
    'attn/qkv/kernel': P(None, 'model'),
    'mlp/kernel': P('data', 'model'),
    'head/kernel': P(None, 'model'),
}


def mesh_2x4() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ('data', 'model'),
              axis_types=(AxisType.Auto,) * 2)


def saved_spec(key: str) -> P:
  return next((s for suffix, s in SPECS.items() if key.endswith(suffix)), P())


def layered_params(seed: int = 0) -> dict:
  """A small unscanned transformer-like tree: embed, LAYERS x (attn qkv, mlp), head."""
  rng = np.random.default_rng(seed)
  flat = {'embed/embedding': rng.normal(size=(VOCAB, D))}
  for i in range(LAYERS):
    flat[f'layers_{i}/attn/qkv/kernel'] = rng.normal(size=(D, 3 * D))
    flat[f'layers_{i}/mlp/kernel'] = rng.normal(size=(D, 2 * D))
    flat[f'layers_{i}/mlp/bias'] = rng.normal(size=(2 * D,))
  flat['head/kernel'] = rng.normal(size=(D, HEADS_OUT))
  flat['head/bias'] = rng.normal(size=(HEADS_OUT,))
  return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep='/')


def train_state(params: dict, tx=None, step: int = 3) -> dict:
  """{'params', 'opt_state', 'step'} after one optimizer step, so the moments are not zeros."""
  tx = tx or optax.adam(1e-2)
  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.5, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
          'step': jnp.asarray(step, jnp.int32)}


def shard(state: dict, mesh: Mesh) -> dict:
  def place(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    return jax.device_put(x, NamedSharding(mesh, saved_spec(key)))
  return jax.tree_util.tree_map_with_path(place, state)


def save_manager(path, state: dict, step: int = 3) -> None:
  with ocp.CheckpointManager(path) as manager:
    manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
    manager.wait_until_finished()


def flat_numpy(tree) -> dict[str, np.ndarray]:
  """'/'-joined keys to host numpy arrays, the way the Flax surgery guide flattens; a typed PRNG
  key becomes its key data (`key_dtypes` tells which leaves were keys)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(
      jax.random.key_data(x) if is_key(x) else x) for p, x in leaves}


def is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)


def key_dtypes(tree) -> dict[str, str]:
  """{key: 'key<impl>'} of the typed PRNG key leaves of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): str(x.dtype) for p, x in leaves if is_key(x)}


def restore_plain(item_dir, mesh: Mesh | None = None) -> dict:
  """The output restored with plain Orbax, each leaf on its saved spec over `mesh` (default: 2x4)."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(item_dir).item_metadata.tree
  mesh = mesh or mesh_2x4()
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(
      mesh, P(*getattr(m.sharding, 'partition_spec', ())))), metadata)
  return checkpointer.restore(item_dir, target)


def normalized(spec) -> P:
  """`spec` without trailing Nones: P('model') and P('model', None) shard alike."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def saved_specs(item_dir) -> dict[str, P]:
  """The PartitionSpec each leaf was written with (normalized), from Orbax metadata."""
  tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'):
          normalized(getattr(m.sharding, 'partition_spec', ())) for p, m in leaves}


def visible_steps(root) -> list[int]:
  """The steps a plain CheckpointManager lists in `root` (none when the folder is not there)."""
  if not root.exists():
    return []
  with ocp.CheckpointManager(root) as manager:
    return list(manager.all_steps())
