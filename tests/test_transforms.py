"""Ops and the planner on literal arrays, in process: fast checks of the semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import checkpoints
from surgery_job import plan as plan_lib, sharding, transforms, tree, validate
from surgery_job.errors import SurgeryError
from surgery_job.transforms import Leaf, State


def state(params: dict, mirrors: tuple[str, ...] = ('mu',), others: dict | None = None) -> State:
  def leaves(values):
    return {k: Leaf(jnp.asarray(v), P()) for k, v in values.items()}
  return State(leaves(params), {root: leaves({k: np.ones_like(v) for k, v in params.items()})
                                for root in mirrors}, leaves(others or {}))


def run(ops: list[dict], s: State) -> State:
  return transforms.apply(transforms.build(ops), s)


def values(tree_: dict) -> dict:
  return {k: np.asarray(leaf.value) for k, leaf in tree_.items()}


def test_rename_moves_params_and_moments():
  out = run([dict(op='rename', pattern=r'a/(\w+)', replacement=r'b/\1')], state({'a/w': [1., 2.], 'c': [3.]}))
  assert list(out.params) == ['b/w', 'c'] and list(out.mirrors['mu']) == ['b/w', 'c']


def test_swap_by_rename_is_not_a_collision():
  out = run([dict(op='rename', pattern='(x|y)', replacement='tmp_\\1'),
             dict(op='rename', pattern='tmp_x', replacement='y'),
             dict(op='rename', pattern='tmp_y', replacement='x')], state({'x': [1.], 'y': [2.]}))
  assert values(out.params) == {'y': [1.], 'x': [2.]}


def test_pad_fills_params_by_init_and_moments_with_zeros():
  out = run([dict(op='pad', pattern='e', axis=0, size=3, init='mean')], state({'e': [[1., 3.], [3., 5.]]}))
  np.testing.assert_array_equal(values(out.params)['e'], [[1, 3], [3, 5], [2, 4]])
  np.testing.assert_array_equal(values(out.mirrors['mu'])['e'], [[1, 1], [1, 1], [0, 0]])


def test_stack_orders_by_index_not_by_name():
  params = {f'l_{i}/w': [float(i)] for i in (10, 9, 8)}
  out = run([dict(op='stack', pattern=r'l_(\d+)/w', replacement='l/w')], state(params))
  np.testing.assert_array_equal(values(out.params)['l/w'], [[8.], [9.], [10.]])


def test_unstack_then_stack_round_trips_with_spec():
  s = State({'l/w': Leaf(jnp.arange(6.).reshape(3, 2), P(None, 'model'))}, {}, {})
  out = run([dict(op='unstack', pattern='l/w', replacement='l_{i}/w')], s)
  assert out.params['l_1/w'].spec == P('model')
  back = run([dict(op='stack', pattern=r'l_(\d+)/w', replacement='l/w')], out)
  assert back.params['l/w'].spec == P(None, 'model')
  np.testing.assert_array_equal(values(back.params)['l/w'], np.arange(6.).reshape(3, 2))


def test_value_ops_leave_moments_alone():
  out = run([dict(op='scale', pattern='w', factor=2.0), dict(op='cast', pattern='w', dtype='bfloat16')],
            state({'w': [1., 2.]}))
  assert out.params['w'].value.dtype == jnp.bfloat16
  np.testing.assert_array_equal(values(out.params)['w'].astype(np.float32), [2., 4.])
  assert out.mirrors['mu']['w'].value.dtype == jnp.float32


def test_shape_op_refuses_factored_moments():
  s = State({'w': Leaf(jnp.ones((4, 8)), P())}, {'v_row': {'w': Leaf(jnp.ones((4,)), P())}}, {})
  with pytest.raises(SurgeryError, match=r"op 0 \(pad\): pad of 'w': optimizer state v_row/w has shape \(4,\).*reset_optimizer"):
    run([dict(op='pad', pattern='w', axis=1, size=16)], s)
  renamed = run([dict(op='rename', pattern='w', replacement='u')], s)
  assert list(renamed.mirrors['v_row']) == ['u']


def test_drop_optimizer_keeps_params_and_step():
  out = run([dict(op='drop_optimizer')], state({'w': [1.]}, others={'step': 3, 'opt/count': 1}))
  assert out.mirrors == {} and list(out.others) == ['step']


def test_layout_finds_adam_moments_as_mirrors():
  params = checkpoints.layered_params()
  keys = list(tree.flatten(checkpoints.train_state(params)))
  layout = tree.find_layout(keys, None)
  assert layout == tree.Layout('params', ('opt_state/0/mu', 'opt_state/0/nu'))
  assert tree.find_layout(keys, 'params').mirror_roots == layout.mirror_roots
  assert tree.find_layout([k for k in keys if k.startswith('params/')], None).mirror_roots == ()


def test_unflatten_keeps_lists_and_empty_states():
  skeleton = {'opt_state': [{'count': 0}, None], 'params': {'w': 0}}
  flat = {'opt_state/0/count': 1, 'params/w': 2, 'params/new': 3}
  assert tree.unflatten(flat, skeleton) == {'opt_state': [{'count': 1}, None], 'params': {'w': 2, 'new': 3}}


def test_plan_finds_sources_and_passthroughs():
  mesh = checkpoints.mesh_2x4()
  inputs = {'params/a': sharding.abstract((4, 8), jnp.float32, mesh, P(None, 'model')),
            'params/b': sharding.abstract((4, 8), jnp.float32, mesh, P()),
            'step': sharding.abstract((), jnp.int32, mesh, P())}
  ops = transforms.build([dict(op='rename', pattern='a', replacement='c'),
                          dict(op='concat', sources=['b', 'c'], axis=0, target='d'),
                          dict(op='copy', source='d', target='e'),
                          dict(op='add', path='f', shape=[4], init='ones')])
  plan = plan_lib.make_plan(ops, tree.Layout('params', ()), inputs, mesh, [('f', ('data',))])
  assert plan.outputs['params/d'].sources == ('params/a', 'params/b')
  assert plan.outputs['params/d'].passthrough is None and plan.outputs['params/d'].shape == (8, 8)
  assert plan.outputs['step'].passthrough == 'step'
  assert plan.outputs['params/f'].spec == P('data') and plan.outputs['params/f'].sources == ()
  assert plan.touched[0] == ('op 0 (rename)', ['params/a', 'params/c'])


def test_make_mesh_fills_and_checks():
  devices = jax.devices()
  assert dict(sharding.make_mesh((-1, 2), ('data', 'model'), None, devices).shape) == {'data': 4, 'model': 2}
  assert dict(sharding.make_mesh(None, None, ((2, 4), ('data', 'model')), devices[:4]).shape) == {'data': 1, 'model': 4}
  with pytest.raises(SurgeryError, match='needs 12 devices, found 8'):
    sharding.make_mesh((3, 4), ('a', 'b'), None, devices)


def test_fit_spec_replicates_what_does_not_divide():
  mesh = checkpoints.mesh_2x4()
  assert sharding.fit_spec(P('data', 'model'), (4, 6), mesh, 'k') == P('data', None)
  assert sharding.fit_spec(P('tensor'), (8,), mesh, 'k') == P(None)


def test_typed_keys_move_with_structural_ops_and_refuse_value_ops():
  keys_ = jax.random.split(jax.random.key(0, impl='rbg'), 3)
  s = State({'layers/rng': Leaf(keys_, P()), 'w': Leaf(jnp.ones(2), P())}, {}, {})
  out = run([dict(op='unstack', pattern='layers/(.*)', replacement=r'layers_{i}/\1')], s)
  assert out.params['layers_2/rng'].value.dtype == keys_.dtype
  np.testing.assert_array_equal(jax.random.key_data(out.params['layers_2/rng'].value),
                                jax.random.key_data(keys_[2]))
  for op in (dict(op='cast', pattern='.*', dtype='bfloat16'), dict(op='scale', pattern='.*', factor=2.0),
             dict(op='pad', pattern='layers/rng', axis=0, size=4)):
    with pytest.raises(SurgeryError, match=rf"op 0 \({op['op']}\): {op['op']} of 'layers/rng': it is a "
                                           r'PRNG key \(key<rbg>\)'):
      run([op], s)


def test_unstack_and_stack_need_one_layer_count():
  s = state({'layers/w': np.zeros((3, 64)), 'layers/b': np.zeros((4, 64))})
  with pytest.raises(SurgeryError, match=r'unstack on axis 0: the leaves it matches do not agree on one '
                                         r'layer count: 3 layers: layers/w; 4 layers: layers/b'):
    run([dict(op='unstack', pattern='layers/(.*)', replacement=r'l_{i}/\1')], s)
  with pytest.raises(SurgeryError, match=r'do not agree on count=3: 64 layers: layers/w, layers/b'):
    run([dict(op='unstack', pattern='layers/(.*)', replacement=r'l_{i}/\1', axis=1, count=3)], s)
  out = run([dict(op='unstack', pattern='layers/(.*)', replacement=r'l_{i}/\1', axis=1, count=64)], s)
  assert out.params['l_63/b'].value.shape == (4,) and out.mirrors['mu']['l_63/w'].value.shape == (3,)
  unequal = state({'a_0/w': [1.], 'a_1/w': [1.], 'b_0/w': [1.]})
  with pytest.raises(SurgeryError, match=r'stack on axis 0: .* count: 2 layers: a/w; 1 layers: b/w'):
    run([dict(op='stack', pattern=r'(?=\w_(\d+))(\w)_\d+/w', replacement=r'\2/w')], unequal)


def whole(params: dict, others: dict) -> State:
  """A state with params under `params` and one mirror, `opt/mu`, as plan.run_ops builds it."""
  s = state(params, mirrors=('opt/mu',), others=others)
  return s.replace(params_root='params')


def test_full_key_patterns_reach_the_whole_tree():
  s = whole({'params/w': [1.], 'b': [2.]}, {'step': 3, 'opt/count': 1, 'nnx_aux/rngs/key': [7]})
  out = run([dict(op='drop', pattern='/nnx_aux/.*')], s)
  assert list(out.others) == ['step', 'opt/count'] and list(out.params) == ['params/w', 'b']
  # A full-key pattern that hits a parameter moves its moments too.
  out = run([dict(op='rename', pattern='/params/params/(.*)', replacement=r'/params/\1')], s)
  assert list(out.params) == ['w', 'b'] and list(out.mirrors['opt/mu']) == ['w', 'b']
  # keep on full keys keeps only what matches, anywhere: here `step`, no params and no moments.
  out = run([dict(op='keep', pattern='/step')], s)
  assert (list(out.params), list(out.others), out.mirrors) == ([], ['step'], {'opt/mu': {}})


def test_full_key_ops_keep_optimizer_state_with_the_params():
  s = whole({'params/w': [1.], 'b': [2.]}, {'step': 3})
  with pytest.raises(SurgeryError, match=r"'/w' would leave params_root 'params', but optimizer state "
                                         r'\(opt/mu\) follows it; add drop_optimizer first'):
    run([dict(op='rename', pattern='/params/params/(.*)', replacement=r'/\1')], s)
  out = run([dict(op='drop_optimizer'),
             dict(op='rename', pattern='/params/params/(.*)', replacement=r'/\1')], s)
  assert list(out.params) == ['b'] and sorted(out.others) == ['step', 'w']
  # A copy or an added leaf outside params_root is a plain leaf: no moments.
  out = run([dict(op='copy', source='/params/b', target='/export/b'),
             dict(op='add', path='/aux/x', shape=[2]), dict(op='add', path='/params/y', shape=[2])], s)
  assert list(out.others) == ['step', 'export/b', 'aux/x']
  assert list(out.mirrors['opt/mu']) == ['params/w', 'b', 'y']
  with pytest.raises(SurgeryError, match=r"pattern '/opt/.\*' matches '/opt/mu/params/w', optimizer state "
                                         'that follows its parameter'):
    run([dict(op='drop', pattern='/opt/.*')], s)
  with pytest.raises(SurgeryError, match=r"'w' is not a full key"):
    run([dict(op='rename', pattern='/params/params/(.*)', replacement=r'\1')], s)


def test_layout_takes_moments_of_some_params_as_mirrors():
  keys = ['model/embed/value', 'model/drop/rngs/key/value', 'model/drop/rngs/count/value',
          'optimizer/opt_state/0/count/value', 'optimizer/opt_state/0/mu/embed/value',
          'optimizer/opt_state/0/nu/embed/value', 'optimizer/step/value']
  assert tree.find_layout(keys, 'model').mirror_roots == ('optimizer/opt_state/0/mu',
                                                          'optimizer/opt_state/0/nu')


def test_typed_keys_are_planned_as_keys():
  mesh = checkpoints.mesh_2x4()

  class Meta:  # What Orbax metadata says of a stacked rbg key: its key data, (3, 4) uint32.
    shape, dtype = (3, 4), np.dtype('uint32')
    sharding = None
  inputs = plan_lib.abstract_inputs({'rng': Meta, 'raw': Meta}, {'rng': 'rbg'}, mesh)
  assert inputs['rng'].shape == (3,) and str(inputs['rng'].dtype) == 'key<rbg>'
  assert inputs['raw'].shape == (3, 4) and inputs['raw'].dtype == np.uint32
  keys_ = jax.random.split(jax.random.key(1, impl='rbg'), 3)
  assert validate.digests({'k': keys_})['k'][2] == validate.digests({'k': jax.random.key_data(keys_)})['k'][2]
  assert validate.digests({'k': keys_})['k'][1] == 'key<rbg>'


def test_stack_with_moments_of_only_some_params():
  leaf = Leaf(jnp.ones(2), P())
  s = State({'l_0/w': leaf, 'l_1/w': leaf, 'l_0/rng': leaf, 'l_1/rng': leaf},
            {'mu': {'l_0/w': leaf, 'l_1/w': leaf}}, {})
  out = run([dict(op='stack', pattern=r'l_(\d+)/(.*)', replacement=r'l/\2')], s)
  assert list(out.params) == ['l/w', 'l/rng'] and list(out.mirrors['mu']) == ['l/w']
  s.mirrors['mu'].pop('l_1/w')
  with pytest.raises(SurgeryError, match="optimizer state holds 'l_0/w' but not all the parts of 'l/w'"):
    run([dict(op='stack', pattern=r'l_(\d+)/(.*)', replacement=r'l/\2')], s)


def test_map_may_reshape_a_leaf_without_moments():
  s = whole({'params/w': [1., 2.]}, {'stats': [1., 2., 3.]})
  out = run([dict(op='map', pattern='/stats', fn='jax.numpy:cumsum')], s)
  np.testing.assert_array_equal(values(out.others)['stats'], [1., 3., 6.])
  out = run([dict(op='map', pattern='/stats', fn='jax.numpy:ravel')], s.replace(
      others={'stats': Leaf(jnp.ones((2, 2)), P())}))
  assert out.others['stats'].value.shape == (4,)
  with pytest.raises(SurgeryError, match="changed the shape of '/params/params/w'"):
    run([dict(op='map', pattern='/params/params/w', fn='jax.numpy:atleast_2d')], s)


def test_a_cast_to_a_leafs_own_dtype_leaves_it_unmeasured():
  # Nothing to lose, so nothing to measure: each measured cast costs the jitted program its statistics.
  s = State({'a': Leaf(jnp.ones(2, jnp.float32), P()), 'b': Leaf(jnp.ones(2, jnp.bfloat16), P())}, {}, {})
  with transforms.values.recording_casts() as records:
    out = run([dict(op='cast', pattern='.*', dtype='float32')], s)
  assert out.params['a'] is s.params['a']
  assert out.params['b'].value.dtype == jnp.float32
  assert [record.key for record in records] == ['b']
