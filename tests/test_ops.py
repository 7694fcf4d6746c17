"""Every op end to end: a real sharded checkpoint with Adam state, the job in a subprocess on 8 fake
devices, the output restored with plain Orbax and compared with a numpy reference, leaf by leaf."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from jobs import ok, surgery

ROOTS = ('params', 'opt_state/0/mu', 'opt_state/0/nu')
MOMENTS = ROOTS[1:]


def renamed(x, rename):
  """Applies `rename(rel) -> new rel or None` to params and both Adam moments."""
  out = {}
  for key, value in x.items():
    root = next((r for r in ROOTS if key.startswith(r + '/')), None)
    if root is None:
      out[key] = value
      continue
    new = rename(key[len(root) + 1:])
    if new is not None:
      out[f'{root}/{new}'] = value
  return out


def per_root(x, rel, fn_params, fn_moments=None):
  """Sets `rel` under each root to fn(old value); moments use fn_moments (default: same as params)."""
  out = dict(x)
  for root in ROOTS:
    fn = fn_params if root == 'params' or fn_moments is None else fn_moments
    out[f'{root}/{rel}'] = fn(x.get(f'{root}/{rel}'))
  return out


def layer_keys(x):
  return sorted({k.split('/', 1)[1] for k in x if re.match(r'params/layers_\d+/', k)})


def ref_stack(x):
  out = renamed(x, lambda rel: None if rel.startswith('layers_') else rel)
  for rel in {r.split('/', 1)[1] for r in layer_keys(x)}:
    for root in ROOTS:
      out[f'{root}/layers/{rel}'] = np.stack([x[f'{root}/layers_{i}/{rel}'] for i in range(3)])
  return out


def ref_split(x):
  out = renamed(x, lambda rel: None if rel.endswith('qkv/kernel') else rel)
  for i in range(3):
    for root in ROOTS:
      q, k, v = np.split(x[f'{root}/layers_{i}/attn/qkv/kernel'], 3, axis=1)
      out.update({f'{root}/layers_{i}/attn/{n}/kernel': a for n, a in zip('qkv', (q, k, v))})
  return out


def ref_pad_mean(x):
  def pad_params(e):
    return np.concatenate([e, np.broadcast_to(e.mean(0, keepdims=True), (4, e.shape[1]))])
  return per_root(x, 'embed/embedding', pad_params, lambda m: np.concatenate([m, np.zeros((4, 8), m.dtype)]))


def bf16(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16))


SPLIT = dict(op='split', source=r'layers_(\d+)/attn/qkv/kernel', axis=1, sizes=[8, 8, 8],
             targets=[r'layers_\1/attn/q/kernel', r'layers_\1/attn/k/kernel', r'layers_\1/attn/v/kernel'])
STACK = dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2')

# (transforms, extra config, numpy reference of the output, expected specs of some output leaves)
CASES = {
    'rename': (
        [dict(op='rename', pattern=r'layers_(\d+)/mlp/(.*)', replacement=r'layers_\1/ffn/\2')], {},
        lambda x: renamed(x, lambda rel: rel.replace('/mlp/', '/ffn/')),
        {'params/layers_0/ffn/kernel': P('data', 'model'), 'opt_state/0/nu/layers_2/ffn/kernel': P('data', 'model')}),
    'drop': (
        [dict(op='drop', pattern='head/.*')], {},
        lambda x: renamed(x, lambda rel: None if rel.startswith('head/') else rel), {}),
    'keep': (
        [dict(op='keep', pattern='embed/.*|head/.*')], {},
        lambda x: renamed(x, lambda rel: rel if rel.split('/')[0] in ('embed', 'head') else None),
        {'params/embed/embedding': P('model')}),
    'copy': (
        [dict(op='copy', source='head/(.*)', target=r'head2/\1')], {},
        lambda x: {**x, **{k.replace('/head/', '/head2/').replace('params/head/', 'params/head2/'): v
                           for k, v in x.items() if '/head/' in '/' + k}},
        {'params/head2/kernel': P(None, 'model'), 'opt_state/0/mu/head2/kernel': P(None, 'model')}),
    'add': (
        [dict(op='add', path='extra/bias', shape=[12], init='constant', value=0.5)], {},
        lambda x: per_root(x, 'extra/bias', lambda _: np.full(12, 0.5, np.float32),
                           lambda _: np.zeros(12, np.float32)),
        {'params/extra/bias': P()}),
    'add_with_rule': (
        [dict(op='add', path='extra/kernel', shape=[8, 4], init='ones')],
        {'partition_rules': [('extra/kernel', (None, 'model'))]},
        lambda x: per_root(x, 'extra/kernel', lambda _: np.ones((8, 4), np.float32),
                           lambda _: np.zeros((8, 4), np.float32)),
        {'params/extra/kernel': P(None, 'model'), 'opt_state/0/mu/extra/kernel': P(None, 'model')}),
    'cast': (
        [dict(op='cast', pattern='.*kernel', dtype='bfloat16')], {},
        lambda x: {k: bf16(v) if k.startswith('params/') and k.endswith('kernel') else v for k, v in x.items()},
        {'params/layers_1/mlp/kernel': P('data', 'model')}),
    'cast_optimizer': (
        [dict(op='cast', pattern='.*kernel', dtype='bfloat16', optimizer=True)], {},
        lambda x: {k: bf16(v) if k.endswith('kernel') else v for k, v in x.items()}, {}),
    'reshape': (
        [dict(op='reshape', pattern='layers_0/attn/qkv/kernel', shape=[8, 3, 8])],
        {'partition_rules': [('qkv/kernel', (None, None, 'model'))]},
        lambda x: per_root(x, 'layers_0/attn/qkv/kernel', lambda a: a.reshape(8, 3, 8)),
        {'params/layers_0/attn/qkv/kernel': P(None, None, 'model'), 'params/layers_1/attn/qkv/kernel': P(None, 'model')}),
    'transpose': (
        [dict(op='transpose', pattern='head/kernel', axes=[1, 0])], {},
        lambda x: per_root(x, 'head/kernel', lambda a: a.T),
        {'params/head/kernel': P('model'), 'opt_state/0/mu/head/kernel': P('model')}),
    'scale': (
        [dict(op='scale', pattern='embed/embedding', factor=0.5)], {},
        lambda x: {**x, 'params/embed/embedding': x['params/embed/embedding'] * np.float32(0.5)}, {}),
    'pad_mean': (
        [dict(op='pad', pattern='embed/embedding', axis=0, size=20, init='mean')], {},
        ref_pad_mean, {'params/embed/embedding': P('model'), 'opt_state/0/nu/embed/embedding': P('model')}),
    'slice': (
        [dict(op='slice', pattern='embed/embedding', axis=0, start=0, stop=8)], {},
        lambda x: per_root(x, 'embed/embedding', lambda a: a[:8]), {'params/embed/embedding': P('model')}),
    'stack': (
        [STACK], {}, ref_stack,
        {'params/layers/mlp/kernel': P(None, 'data', 'model'), 'opt_state/0/mu/layers/attn/qkv/kernel': P(None, None, 'model')}),
    'unstack': (
        [STACK, dict(op='unstack', pattern='layers/(.*)', replacement=r'block_{i}/\1')], {},
        lambda x: renamed(x, lambda rel: re.sub(r'^layers_(\d+)/', r'block_\1/', rel)),
        {'params/block_2/mlp/kernel': P('data', 'model')}),
    'split': ([SPLIT], {}, ref_split, {'params/layers_0/attn/q/kernel': P(None, 'model')}),
    'concat': (
        [SPLIT, dict(op='concat', sources=[r'layers_(\d+)/attn/q/kernel', r'layers_(\d+)/attn/k/kernel',
                                           r'layers_(\d+)/attn/v/kernel'], axis=1, target=r'layers_\1/attn/qkv/kernel')],
        {}, lambda x: x, {'params/layers_1/attn/qkv/kernel': P(None, 'model')}),
    'split_heads': (
        [dict(op='split_heads', pattern='layers_0/attn/qkv/kernel', axis=1, heads=4)], {},
        lambda x: per_root(x, 'layers_0/attn/qkv/kernel', lambda a: a.reshape(8, 4, 6)),
        {'params/layers_0/attn/qkv/kernel': P(None, 'model'), 'opt_state/0/mu/layers_0/attn/qkv/kernel': P(None, 'model')}),
    'merge_heads': (
        [dict(op='split_heads', pattern=r'layers_\d+/attn/qkv/kernel', axis=1, heads=4),
         dict(op='merge_heads', pattern=r'layers_\d+/attn/qkv/kernel', axis=1)], {},
        lambda x: x, {'params/layers_2/attn/qkv/kernel': P(None, 'model')}),
    'rotary': (
        [dict(op='rotary', pattern='layers_1/attn/qkv/kernel', to='halves')], {},
        lambda x: per_root(x, 'layers_1/attn/qkv/kernel', lambda a: np.concatenate([a[:, 0::2], a[:, 1::2]], 1)),
        {'params/layers_1/attn/qkv/kernel': P(None, 'model')}),
    'map': (
        [dict(op='map', pattern='head/kernel', fn='jax.numpy:negative')], {},
        lambda x: {**x, 'params/head/kernel': -x['params/head/kernel']}, {}),
    'reset_optimizer': (
        [dict(op='reset_optimizer', pattern='embed/.*')], {},
        lambda x: per_root(x, 'embed/embedding', lambda a: a, np.zeros_like), {}),
    'drop_optimizer': (
        [dict(op='drop_optimizer')], {},
        lambda x: {k: v for k, v in x.items() if not k.startswith('opt_state/')}, {}),
    'set_step': (
        [dict(op='set_step', value=100)], {},
        lambda x: {**x, 'step': np.asarray(100, np.int32)}, {}),
}


ROUNDING = {'pad_mean'}


def structural_target(flat: dict, mesh) -> dict:
  """The guide's structural unit test: `jax.eval_shape(tx.init, params)` of the new params."""
  params_before_cast = traverse_util.unflatten_dict(
      {tuple(k.split('/')[3:]): jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()
       if k.startswith('opt_state/0/mu/')})
  params = traverse_util.unflatten_dict(
      {tuple(k.split('/')[1:]): jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()
       if k.startswith('params/')})
  target = {'params': params, 'opt_state': jax.eval_shape(optax.adam(1e-2).init, params_before_cast),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())), target)


def check_case(name: str, item_dir, x: dict) -> None:
  """The output at `item_dir` of CASES[name] on input `x`: values, dtypes, specs, optax structure."""
  _, _, reference, specs = CASES[name]
  got = checkpoints.flat_numpy(checkpoints.restore_plain(item_dir))
  want = reference(x)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    if name in ROUNDING:  # A sharded mean sums in another order than numpy.
      np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  saved = checkpoints.saved_specs(item_dir)
  for key, spec in specs.items():
    assert saved[key] == checkpoints.normalized(spec), key
  if any(k.startswith('opt_state/') for k in want):
    restored = ocp.StandardCheckpointer().restore(item_dir, structural_target(want, checkpoints.mesh_2x4()))
    assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  for key in want:  # Unchanged leaves keep the spec they were saved with.
    if key in x and np.array_equal(want[key], x[key]) and key not in specs and want[key].ndim:
      assert saved[key] == checkpoints.normalized(checkpoints.saved_spec(key)), key


@pytest.mark.parametrize('name', list(CASES))
def test_op_end_to_end(name, layered, tmp_path):
  transforms, extra, _, _ = CASES[name]
  in_path, x = layered
  out, result = surgery(tmp_path, in_path, transforms, **extra)
  ok(result)
  check_case(name, out / '3' / 'default', x)


def test_add_normal_is_seeded_and_scaled(layered, tmp_path):
  in_path, _ = layered
  out, result = surgery(tmp_path, in_path, [
      dict(op='add', path='big/kernel', shape=[64, 64], init='normal', stddev=0.02, seed=1),
      dict(op='add', path='trunc/kernel', shape=[64, 64], init='truncated_normal', stddev=0.1)])
  ok(result)
  got = checkpoints.flat_numpy(checkpoints.restore_plain(out / '3' / 'default'))
  kernel = got['params/big/kernel']
  assert abs(kernel.mean()) < 0.002 and 0.018 < kernel.std() < 0.022
  assert np.abs(got['params/trunc/kernel']).max() <= 0.2 + 1e-6
  assert not np.any(got['opt_state/0/mu/big/kernel'])


def test_report_describes_the_surgery(layered, tmp_path):
  in_path, _ = layered
  out, result = surgery(tmp_path, in_path, [STACK, dict(op='drop', pattern='head/bias')])
  ok(result)
  import json
  report = json.loads((out / '3' / 'surgery_report.json').read_text())
  assert report['input']['step'] == 3 and report['output']['step'] == 3
  assert report['validation']['ok'] is True
  leaf = report['leaves']['params/layers/mlp/kernel']
  assert leaf['shape'] == [3, 8, 16] and leaf['dtype'] == 'float32'
  assert leaf['spec'] == [None, 'data', 'model']
  assert leaf['sources'] == [f'params/layers_{i}/mlp/kernel' for i in range(3)]
  assert 'params/head/bias' in report['ops'][1]['touched']
  assert report['bytes_written'] > 0 and report['bytes_read'] > 0
  assert {'restore', 'transform', 'write', 'validate'} <= set(report['seconds'])
