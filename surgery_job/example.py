"""The small example checkpoint: the Flax "Model Surgery" guide's CNN with optax Adam state.

`python -m surgery_job.example --path=DIR` writes it as a CheckpointManager directory (step 1,
item `default`), sharded over a ('data', 'model') mesh of all devices.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from surgery_job import paths, quiet


class CNN(nn.Module):
  """The guide's CNN."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=256)(x))
    return nn.log_softmax(nn.Dense(features=10)(x))


# Specs on a ('data', 'model') mesh; leaves not listed are replicated.
SPECS = {
    'Conv_0/kernel': P(None, None, None, 'model'),
    'Conv_1/kernel': P(None, None, None, 'model'),
    'Dense_0/kernel': P('data', 'model'),
    'Dense_1/kernel': P('model', None),
}


def example_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  model = 4 if devices.size % 4 == 0 else 1
  return Mesh(devices.reshape(-1, model), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)


def example_state(mesh: Mesh, seed: int = 0) -> dict:
  """{'params', 'opt_state', 'step'} after one Adam step, so that the moments are not zeros."""
  model, tx = CNN(), optax.adam(1e-3)
  params = model.init(jax.random.key(seed), jnp.ones((1, 28, 28, 1)))['params']
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)

  def place(path, x):
    key = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    spec = next((s for suffix, s in SPECS.items() if key.endswith(suffix)), P())
    return jax.device_put(x, NamedSharding(mesh, spec))
  state = {'params': params, 'opt_state': opt_state, 'step': jnp.asarray(1, jnp.int32)}
  return jax.tree_util.tree_map_with_path(place, state)


def save_example(path: str, step: int = 1, mesh: Mesh | None = None) -> dict:
  state = example_state(mesh or example_mesh())
  with ocp.CheckpointManager(paths.of(path)) as manager:
    manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
  return state


_PATH = flags.DEFINE_string('path', None, 'Where to write the example CheckpointManager directory.',
                            required=True)


def main(argv) -> None:
  del argv
  quiet.install()
  save_example(_PATH.value)
  print(f'Wrote the example CNN checkpoint (params, Adam state, step) to {_PATH.value}')


if __name__ == '__main__':
  app.run(main)
