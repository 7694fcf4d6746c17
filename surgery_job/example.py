"""Small example checkpoints, one per kind of tree the ready configs expect, each with optax Adam
state, sharded over a ('data', 'model') mesh of all devices.

  python -m surgery_job.example --path=DIR [--kind=KIND]

KIND: `cnn` (default; the Flax "Model Surgery" guide's CNN, as `make demo` writes it),
`transformer` (unscanned `layers_N` blocks with separate `query`, `key`, `value` projections, an
`embed/embedding` and an untied `lm_head`: for scan_layers, fuse_qkv and vocab_resize),
`scanned_transformer` (the same with its blocks stacked on axis 0 under `layers`: for
unscan_layers), both as CheckpointManager directories (step 1, item `default`); and
`flax_msgpack` (the CNN with a flax.optim Adam state, a `checkpoint_1` msgpack file in DIR as
`flax.training.checkpoints` saved it: for legacy_flax_optim_to_optax); `maxtext_llama` (a tiny
MaxText Llama training run with grouped-query attention, Linen `params/params/...` scanned on axis 1,
steps 1, 2 and 3 of Adam each in item `items` as MaxText saves them: for maxtext_llama_to_hf, and
for average_last_n, soup, task_vector and slerp on its steps).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from flax import serialization, traverse_util
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


def transformer_params(layers: int = 4, width: int = 64, vocab: int = 256, scanned: bool = False,
                       seed: int = 0) -> dict:
  """A small decoder's params as Flax names them; `scanned`: blocks stacked on axis 0 under
  `layers`, as `nn.scan` keeps them."""
  rng = np.random.default_rng(seed)

  def dense(features_in, features_out):
    return {'kernel': rng.normal(0, 0.02, (features_in, features_out)).astype(np.float32),
            'bias': np.zeros((features_out,), np.float32)}

  blocks = [{'attn': {name: dense(width, width) for name in ('query', 'key', 'value', 'out')},
             'mlp': {'up': dense(width, 4 * width), 'down': dense(4 * width, width)}}
            for _ in range(layers)]
  params = {'embed': {'embedding': rng.normal(0, 0.02, (vocab, width)).astype(np.float32)},
            'lm_head': dense(width, vocab)}
  if scanned:
    params['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  else:
    params.update({f'layers_{i}': block for i, block in enumerate(blocks)})
  return params


def _spec(key: str, ndim: int) -> P:
  """The example's saved spec: a kernel's output features on 'model' (and a scanned kernel's too)."""
  spec = next((s for suffix, s in SPECS.items() if key.endswith(suffix)), None)
  if spec is None and key.endswith('kernel') and ndim >= 2:
    spec = P(*(None,) * (ndim - 1), 'model')
  return spec or P()


def _adam_state(params: dict, mesh: Mesh) -> dict:
  """{'params', 'opt_state', 'step'} after one Adam step, placed with the example's specs."""
  tx = optax.adam(1e-3)
  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return _placed({'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
                  'step': jnp.asarray(1, jnp.int32)}, mesh)


# A tiny Llama: hidden, layers, query heads, kv heads, head_dim, mlp, vocab.
LLAMA_SIZES = dict(embed=64, layers=2, q_heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=256)


def maxtext_llama_params(seed: int = 0) -> dict:
  """MaxText's Linen Llama params (`params/...` as its TrainState holds them), scanned: each layer's
  tensors stacked on axis 1 (`param_scan_axis`); kernels scaled by their fan-in, norms around 1."""
  rng = np.random.default_rng(seed)
  e, n, nq, nkv, d, f, v = (LLAMA_SIZES[k] for k in ('embed', 'layers', 'q_heads', 'kv_heads',
                                                     'head_dim', 'mlp', 'vocab'))

  def draw(shape, fan_in=0):
    x = 1 + 0.2 * rng.normal(size=shape) if fan_in == 0 else rng.normal(size=shape) / np.sqrt(fan_in)
    return x.astype(np.float32)
  layers = {'pre_self_attention_layer_norm': {'scale': draw((e, n))},
            'post_self_attention_layer_norm': {'scale': draw((e, n))},
            'self_attention': {'query': {'kernel': draw((e, n, nq, d), e)},
                               'key': {'kernel': draw((e, n, nkv, d), e)},
                               'value': {'kernel': draw((e, n, nkv, d), e)},
                               'out': {'kernel': draw((nq, n, d, e), nq * d)}},
            'mlp': {'wi_0': {'kernel': draw((e, n, f), e)}, 'wi_1': {'kernel': draw((e, n, f), e)},
                    'wo': {'kernel': draw((f, n, e), f)}}}
  return {'params': {'token_embedder': {'embedding': draw((v, e), 1)},
                     'decoder': {'decoder_norm': {'scale': draw((e,))},
                                 'logits_dense': {'kernel': draw((e, v), e)},
                                 'layers': layers}}}


def training_run(params: dict, mesh: Mesh, steps: int = 3) -> list[dict]:
  """The states a run saves after each of `steps` Adam steps: {'params', 'opt_state', 'step'}."""
  tx = optax.adam(1e-2)

  @jax.jit  # One compilation for the whole update, not one per operation and leaf shape.
  def train_step(params, opt_state, step):
    grads = jax.tree.map(lambda p: jnp.sin(step * p) + 0.1, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)
  states = []
  for step in range(1, steps + 1):
    params, opt_state = train_step(params, opt_state, jnp.float32(step))
    states.append(_placed({'params': params, 'opt_state': opt_state,
                           'step': jnp.asarray(step, jnp.int32)}, mesh))
  return states


def _placed(state: dict, mesh: Mesh) -> dict:
  def place(path, x):
    key = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    return jax.device_put(x, NamedSharding(mesh, _spec(key, x.ndim)))
  return jax.tree_util.tree_map_with_path(place, state)


def flax_optim_state(params: dict, step: int = 1, seed: int = 0) -> dict:
  """A flax.optim Adam Optimizer's state dict, as the guide prints it: `target`, and `state` with
  `step` and each parameter's `grad_ema` and `grad_sq_ema`."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params, sep='/')
  param_states = {k: {'grad_ema': rng.normal(size=v.shape).astype(np.float32) * 0.1,
                      'grad_sq_ema': rng.uniform(0.01, 0.1, size=v.shape).astype(np.float32)}
                  for k, v in flat.items()}
  return {'target': jax.tree.map(np.asarray, params),
          'state': {'step': np.asarray(step, np.int32),
                    'param_states': traverse_util.unflatten_dict(param_states, sep='/')}}


def save_example(path: str, step: int = 1, mesh: Mesh | None = None, kind: str = 'cnn') -> dict:
  """Writes the example of `kind` (see the module's docstring) to `path` at `step` (the
  maxtext_llama run: steps 1 to 3); returns its (last) state."""
  mesh = mesh or example_mesh()
  if kind == 'flax_msgpack':
    state = flax_optim_state(example_state(mesh)['params'], step)
    folder = paths.of(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'checkpoint_{step}').write_bytes(serialization.to_bytes(state))
    return state
  if kind == 'maxtext_llama':
    states = training_run(maxtext_llama_params(), mesh)
    with ocp.CheckpointManager(paths.of(path)) as manager:
      for state in states:
        manager.save(int(state['step']), args=ocp.args.Composite(items=ocp.args.StandardSave(state)))
      manager.wait_until_finished()
    return states[-1]
  state = (example_state(mesh) if kind == 'cnn'
           else _adam_state(transformer_params(scanned=kind == 'scanned_transformer'), mesh))
  with ocp.CheckpointManager(paths.of(path)) as manager:
    manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
  return state


KINDS = {'cnn': 'the example CNN checkpoint (params, Adam state, step)',
         'transformer': 'the example transformer checkpoint (unscanned layers, separate query, key '
                        'and value; params, Adam state, step)',
         'scanned_transformer': 'the example scanned transformer checkpoint (params, Adam state, '
                                'step)',
         'flax_msgpack': 'the example flax.optim Adam checkpoint (msgpack, checkpoint_1)',
         'maxtext_llama': 'the example MaxText Llama run (steps 1, 2, 3; params, Adam state, step)'}

_PATH = flags.DEFINE_string('path', None, 'Where to write the example.', required=True)
_KIND = flags.DEFINE_enum('kind', 'cnn', list(KINDS), 'Which example to write.')


def main(argv) -> None:
  del argv
  quiet.install()
  save_example(_PATH.value, kind=_KIND.value)
  print(f'Wrote {KINDS[_KIND.value]} to {_PATH.value}')


if __name__ == '__main__':
  app.run(main)
