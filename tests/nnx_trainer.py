"""A small Flax NNX trainer, written as the NNX guides write one: a model with dropout rngs, an
`nnx.Optimizer` over optax adamw, one jitted train step, and checkpoints of `nnx.state` saved and
restored with Orbax into the abstract state of `nnx.eval_shape`. Its blocks are scanned (stacked by
`nnx.vmap`, run by `nnx.scan`) or not (an `nnx.List`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

VOCAB, D, LAYERS, BATCH, LENGTH = 16, 8, 3, 2, 4

# Specs on the ('data', 'model') 2x4 mesh by key suffix; scanned blocks have a leading layer axis.
SPECS = {
    'embed/embedding/value': P('model', None),
    'linear/kernel/value': P('data', 'model'),
    'head/kernel/value': P(None, 'model'),
}


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(D, D, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return x + self.dropout(nnx.relu(self.linear(x)))


class Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, scanned: bool = True):
    self.scanned = scanned
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    if scanned:
      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def blocks(rngs):
        return Block(rngs)
      self.blocks = blocks(rngs)
    else:
      self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.head = nnx.Linear(D, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    if self.scanned:
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def run(block, x):
        return block(x)
      x = run(self.blocks, x)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(x)


def create(vocab: int = VOCAB, scanned: bool = True, seed: int = 0):
  # Dropout draws from unsafe_rbg keys, as MaxText's do; the params from the default threefry.
  model = Model(nnx.Rngs(params=seed, dropout=jax.random.key(seed + 1, impl='unsafe_rbg')), vocab, scanned)
  return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens, targets):
  def loss_fn(model):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def batch(vocab: int = VOCAB, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (BATCH, LENGTH)), jnp.int32)
  return tokens, jnp.roll(tokens, -1, axis=1)


def spec_of(key: str, ndim: int) -> P:
  spec = next((s for suffix, s in SPECS.items() if key.endswith(suffix)), P())
  return P(*([None] * (ndim - len(spec)) + list(spec))) if len(spec) else spec


def checkpoint_state(model, optimizer) -> dict:
  """What the trainer saves: the model's and the optimizer's `nnx.state`."""
  return {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}


def shard(state, mesh):
  def place(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    return jax.device_put(x, NamedSharding(mesh, spec_of(key, x.ndim)))
  return jax.tree_util.tree_map_with_path(place, state)


def trained(mesh, scanned: bool = True, steps: int = 2) -> dict:
  """The state after `steps` train steps (moments and rng counts are not their initial values)."""
  model, optimizer = create(scanned=scanned)
  for step in range(steps):
    train_step(model, optimizer, *batch(seed=step))
  return shard(checkpoint_state(model, optimizer), mesh)


def resume(item_dir, mesh, vocab: int = VOCAB, scanned: bool = True):
  """Restores a checkpoint into the trainer's own abstract state and runs one more train step;
  returns (restored state, loss)."""
  abstract = checkpoint_state(*nnx.eval_shape(lambda: create(vocab, scanned)))
  target = jax.tree_util.tree_map_with_path(lambda p, x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, spec_of(
          jax.tree_util.keystr(p, simple=True, separator='/'), len(x.shape)))), abstract)
  restored = ocp.StandardCheckpointer().restore(item_dir, target)
  model, optimizer = create(vocab, scanned, seed=7)
  nnx.update(model, restored['model'])
  nnx.update(optimizer, restored['optimizer'])
  loss = train_step(model, optimizer, *batch(vocab, seed=9))
  return restored, float(loss)
