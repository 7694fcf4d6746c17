"""Legacy Flax checkpoints: flax.optim's layout and `checkpoint_<step>` msgpack files, operated on and
converted to Orbax + optax, as the Flax "Model Surgery" guide's own optimizer state was."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization, traverse_util
from jax.sharding import PartitionSpec as P, SingleDeviceSharding

import checkpoints
from jobs import REPO, launch, ok, run_job, surgery, write_config
from surgery_job import (
  config as config_lib,
  example,
  formats,
  memory,
  plan as plan_lib,
  transforms,
  tree,
)
from surgery_job.errors import SurgeryError
from surgery_job.formats import flax_msgpack as legacy_flax
from surgery_job.transforms import Leaf
from test_bad_input import assert_bad_input
from test_memory import fake_cgroup

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8  # flax.optim.Adam's defaults, and optax.adam's.
STEP = 7
CONVERT = REPO / 'configs' / 'legacy_flax_optim_to_optax.py'


def guide_params() -> dict[str, np.ndarray]:
  """The guide CNN's params (Conv_0, Conv_1, Dense_0, Dense_1), flat, with random values."""
  shapes = jax.eval_shape(lambda: example.CNN().init(jax.random.key(0), jnp.ones((1, 28, 28, 1))))
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s.shape).astype(np.float32)
          for k, s in tree.flatten(shapes['params']).items()}


def flax_optim_state(params: dict[str, np.ndarray], step: int, seed: int) -> dict:
  """The state dict of a flax.optim Adam Optimizer, as the guide prints it: `target`, and `state`
  with `step` and each parameter's `grad_ema` and `grad_sq_ema`."""
  rng = np.random.default_rng(seed)
  param_states = {k: {'grad_ema': rng.normal(size=v.shape).astype(np.float32) * 0.1,
                      'grad_sq_ema': rng.uniform(0.01, 0.1, size=v.shape).astype(np.float32)}
                  for k, v in params.items()}
  return {'target': traverse_util.unflatten_dict(params, sep='/'),
          'state': {'step': np.asarray(step, np.int32),
                    'param_states': traverse_util.unflatten_dict(param_states, sep='/')}}


@pytest.fixture(scope='module')
def msgpack_dir(tmp_path_factory):
  """A folder of two msgpack checkpoints (steps 3 and 7) as flax.training.checkpoints names them;
  returns it and the flat state of the latest."""
  folder = tmp_path_factory.mktemp('flax_optim')
  params = guide_params()
  for step in (3, STEP):
    state = flax_optim_state(params if step == STEP else {k: v + 1 for k, v in params.items()},
                             step, seed=step)
    (folder / f'checkpoint_{step}').write_bytes(serialization.to_bytes(state))
  return folder, tree.flatten(state)


def test_flax_optim_layout_has_suffix_mirrors():
  keys = ['target/Conv_0/bias', 'target/Dense_0/kernel', 'state/step',
          'state/param_states/Conv_0/bias/grad_ema', 'state/param_states/Conv_0/bias/grad_sq_ema',
          'state/param_states/Dense_0/kernel/grad_ema', 'state/param_states/Dense_0/kernel/grad_sq_ema']
  layout = tree.find_layout(keys, None)
  assert layout == tree.Layout('target', ('state/param_states/*/grad_ema',
                                          'state/param_states/*/grad_sq_ema'))
  wrapped = tree.find_layout([f'optimizer/{k}' for k in keys], None)
  assert wrapped.params_root == 'optimizer/target'
  params, mirrors, others = layout.split({k: k for k in keys})
  assert params == {'Conv_0/bias': 'target/Conv_0/bias', 'Dense_0/kernel': 'target/Dense_0/kernel'}
  assert mirrors['state/param_states/*/grad_sq_ema'] == {
      'Conv_0/bias': 'state/param_states/Conv_0/bias/grad_sq_ema',
      'Dense_0/kernel': 'state/param_states/Dense_0/kernel/grad_sq_ema'}
  assert others == {'state/step': 'state/step'}


def test_every_structural_op_moves_suffix_slots():
  keys = {'target/l_0/qkv': np.arange(6.), 'target/l_1/qkv': np.arange(6.) + 10, 'target/old': np.ones(2)}
  flat = {**keys, 'state/step': np.asarray(5)}
  for key, value in keys.items():
    rel = key.removeprefix('target/')
    flat[f'state/param_states/{rel}/momentum'] = -value
  layout = tree.find_layout(list(flat), None)
  assert layout.mirror_roots == ('state/param_states/*/momentum',)
  ops = transforms.build([
      dict(op='drop', pattern='old'),
      dict(op='stack', pattern=r'l_(\d+)/qkv', replacement='l/qkv'),
      dict(op='split', source='l/qkv', axis=1, sizes=[2, 4], targets=['l/q', 'l/kv']),
      dict(op='pad', pattern='l/q', axis=1, size=3),
      dict(op='rename', pattern='l/kv', replacement='l/key_value'),
      dict(op='add', path='l/bias', shape=[2], init='ones')])
  out = plan_lib.run_ops(ops, layout, {k: Leaf(jnp.asarray(v), P()) for k, v in flat.items()})
  got = {k: np.asarray(leaf.value) for k, leaf in out.items()}
  q = np.array([[0., 1., 0.], [10., 11., 0.]])
  kv = np.array([[2., 3., 4., 5.], [12., 13., 14., 15.]])
  want = {'target/l/q': q, 'target/l/key_value': kv, 'target/l/bias': np.ones(2),
          'state/param_states/l/q/momentum': -q, 'state/param_states/l/key_value/momentum': -kv,
          'state/param_states/l/bias/momentum': np.zeros(2), 'state/step': np.asarray(5)}
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def restore_converted(out, params: dict[str, np.ndarray]) -> dict:
  """The output as a Flax + optax loop restores it: a CheckpointManager step, into
  `jax.eval_shape(optax.adam(lr).init, params)`, with plain Orbax."""
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 traverse_util.unflatten_dict(params, sep='/'))
  target = {'params': abstract_params,
            'opt_state': jax.eval_shape(optax.adam(LR).init, abstract_params),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  device = SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  with ocp.CheckpointManager(out) as manager:
    assert list(manager.all_steps()) == [STEP]
    return manager.restore(STEP, args=ocp.args.StandardRestore(target))


def test_convert_flax_optim_adam_to_optax(msgpack_dir, tmp_path):
  folder, old = msgpack_dir
  out = tmp_path / 'out'
  ok(run_job(CONVERT, f'--config.input.path={folder}', f'--config.output.path={out}'))
  params = {k.removeprefix('target/'): v for k, v in old.items() if k.startswith('target/')}
  restored = restore_converted(out, params)
  adam_state, empty = restored['opt_state']
  assert isinstance(adam_state, optax.ScaleByAdamState) and isinstance(empty, optax.EmptyState)
  assert int(restored['step']) == STEP and int(adam_state.count) == STEP
  assert adam_state.count.dtype == jnp.int32
  got = {'params': tree.flatten(restored['params']), 'mu': tree.flatten(adam_state.mu),
         'nu': tree.flatten(adam_state.nu)}
  assert sorted(got['params']) == sorted(got['mu']) == sorted(got['nu']) == sorted(params)
  for key in params:
    np.testing.assert_array_equal(got['params'][key], old[f'target/{key}'], err_msg=key)
    np.testing.assert_array_equal(got['mu'][key], old[f'state/param_states/{key}/grad_ema'])
    np.testing.assert_array_equal(got['nu'][key], old[f'state/param_states/{key}/grad_sq_ema'])

  # One optax step from the converted state is the flax.optim Adam step from the old one.
  grads = {k: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  tx = optax.adam(LR, B1, B2, EPS)
  updates, new_state = tx.update(traverse_util.unflatten_dict(grads, sep='/'), restored['opt_state'])
  new_params = tree.flatten(optax.apply_updates(restored['params'], updates))
  t = STEP + 1
  for key, param in params.items():
    g = grads[key]
    grad_ema = B1 * old[f'state/param_states/{key}/grad_ema'] + (1 - B1) * g
    grad_sq_ema = B2 * old[f'state/param_states/{key}/grad_sq_ema'] + (1 - B2) * g * g
    denom = np.sqrt(grad_sq_ema / (1 - B2 ** t)) + EPS
    want = param - LR * (grad_ema / (1 - B1 ** t)) / denom
    np.testing.assert_allclose(new_params[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(tree.flatten(new_state[0].mu)[key], grad_ema, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(tree.flatten(new_state[0].nu)[key], grad_sq_ema, rtol=1e-6, atol=1e-9)
  assert int(new_state[0].count) == t

  # A reviewer's check: the msgpack input run through the config in memory equals the output.
  diff = subprocess.run([sys.executable, '-m', 'surgery_job.diff', str(folder), str(out), '--values',
                         '--map', str(CONVERT)], cwd=REPO, capture_output=True, text=True, check=False)
  assert diff.returncode == 0, diff.stdout[-2000:] + diff.stderr[-2000:]
  assert diff.stdout.splitlines()[-1] == (
      f'EQUAL: 0 only in A, 0 only in B, 0 changed; {2 + 3 * len(params)} of {2 + 3 * len(params)} '
      'leaves bit-equal')


def test_guide_surgery_on_the_flax_optim_layout(msgpack_dir, tmp_path):
  folder, old = msgpack_dir
  rename = dict(op='rename', pattern=r'Conv_0/(.*)', replacement=r'ConvIn/\1')
  pad = dict(op='pad', pattern='Dense_1/kernel', axis=1, size=16)
  out, result = surgery(tmp_path, folder / f'checkpoint_{STEP}', [rename, pad],
                        partition_rules=[('Dense_0/kernel', (None, 'data'))])
  ok(result)
  item_dir = out / str(STEP) / 'default'
  got = checkpoints.flat_numpy(checkpoints.restore_plain(item_dir))
  renamed = {k: k.replace('Conv_0/', 'ConvIn/') for k in old}
  assert sorted(got) == sorted(renamed.values())
  for key, new in renamed.items():
    if 'Dense_1/kernel' not in key:
      np.testing.assert_array_equal(got[new], old[key], err_msg=key)
  for key in ('target/Dense_1/kernel', 'state/param_states/Dense_1/kernel/grad_ema',
              'state/param_states/Dense_1/kernel/grad_sq_ema'):
    assert got[key].shape == (256, 16)
    np.testing.assert_array_equal(got[key][:, :10], old[key], err_msg=key)
    assert not np.any(got[key][:, 10:]), key
  # The file records no sharding: the rule gives the param and both its slots theirs.
  specs = checkpoints.saved_specs(item_dir)
  assert specs['target/Dense_0/kernel'] == P(None, 'data')
  assert specs['state/param_states/Dense_0/kernel/grad_sq_ema'] == P(None, 'data')
  assert specs['target/Conv_1/kernel'] == P()


@pytest.mark.parametrize('case', ['truncated', 'not_a_checkpoint', 'missing_step'])
def test_bad_msgpack_input_is_one_line_and_writes_nothing(msgpack_dir, tmp_path, case):
  folder, _ = msgpack_dir
  bad, step = tmp_path / 'in', []
  bad.mkdir()
  data = (folder / f'checkpoint_{STEP}').read_bytes()
  if case == 'truncated':
    (bad / 'checkpoint_5').write_bytes(data[:len(data) // 2])
    expected = 'is not a readable Flax msgpack checkpoint (truncated, or another kind of file)'
  elif case == 'not_a_checkpoint':
    (bad / 'checkpoint_5').write_text('step,loss\n5,0.25\n')
    expected = 'is not a readable Flax msgpack checkpoint'
  else:
    (bad / 'checkpoint_5').write_bytes(data)
    step, expected = ['--config.input.step=9'], 'input.step 9 not found'
  out = tmp_path / 'out'
  result = run_job(CONVERT, f'--config.input.path={bad}', f'--config.output.path={out}', *step)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('surgery-job: error: ') and expected in last, last
  assert not out.exists()


def test_msgpack_is_detected_and_steps_listed(msgpack_dir, layered, tmp_path):
  folder, _ = msgpack_dir
  assert legacy_flax.detect(str(folder))
  assert legacy_flax.detect(str(folder / 'checkpoint_3'))
  (tmp_path / 'notes.txt').write_text('not a checkpoint')
  assert not legacy_flax.detect(str(tmp_path / 'notes.txt'))  # Orbax's error names it.
  assert not legacy_flax.detect(str(layered[0]))
  assert formats.reader(str(folder), 'orbax') is formats.module('orbax')
  assert legacy_flax.select_steps(str(folder), 'all', lambda step: False) == [3, STEP]
  assert legacy_flax.select_steps(str(folder), 'new', lambda step: step == 3) == [STEP]
  input_config = config_lib.get_default_config().input
  input_config.path = str(folder)
  assert legacy_flax.locate(input_config, None).step == STEP
  assert legacy_flax.locate(input_config, 3).root.name == 'checkpoint_3'


@pytest.mark.parametrize('fits', [False, True])
def test_the_budget_counts_the_decoded_file(msgpack_dir, tmp_path, fits):
  folder, old = msgpack_dir
  held = sum(v.nbytes for v in old.values())
  largest = 2 * old['target/Dense_0/kernel'].nbytes  # Read and written (one device: one copy).
  limit = int((held + largest) / memory.SHARE) + (1000 if fits else -1000)
  config = write_config(tmp_path, {'dry_run': True})
  result = run_job(config, f'--config.input.path={folder}', devices=1,
                   env=fake_cgroup(tmp_path, limit, 0))
  if fits:
    ok(result)
    assert int(re.search(r'Groups: (\d+)', result.stdout).group(1)) > 1
  else:
    assert result.returncode == 2
    assert (f'beside the {held / 1e9:.3f} GB of the msgpack input held in memory, over the memory '
            'budget') in result.stderr.strip().splitlines()[-1]


def test_two_processes_convert_with_shards_on_both(msgpack_dir, tmp_path):
  folder, old = msgpack_dir
  config = tmp_path / 'sharded.py'
  config.write_text('from configs.legacy_flax_optim_to_optax import get_config as convert\n\n\n'
                    'def get_config():\n  config = convert()\n'
                    "  config.partition_rules = [('Dense_0/kernel', ('data', None))]\n"
                    '  return config\n')
  out = tmp_path / 'out'
  ok(launch(2, f'--config={config}', f'--config.input.path={folder}', f'--config.output.path={out}',
            log_dir=tmp_path / 'logs'))
  item_dir = out / str(STEP) / 'default'
  assert len(list(item_dir.glob('ocdbt.process_*'))) == 2  # Each process wrote its shards.
  specs = checkpoints.saved_specs(item_dir)
  assert specs['params/Dense_0/kernel'] == specs['opt_state/0/nu/Dense_0/kernel'] == P('data')
  params = {k.removeprefix('target/'): v for k, v in old.items() if k.startswith('target/')}
  restored = restore_converted(out, params)
  np.testing.assert_array_equal(restored['params']['Dense_0']['kernel'], old['target/Dense_0/kernel'])
  np.testing.assert_array_equal(restored['opt_state'][0].nu['Dense_0']['kernel'],
                                old['state/param_states/Dense_0/kernel/grad_sq_ema'])


def test_an_optimizer_field_in_a_file_without_a_step_becomes_one_pytree(msgpack_dir, tmp_path):
  folder, old = msgpack_dir
  state = serialization.msgpack_restore((folder / f'checkpoint_{STEP}').read_bytes())
  source = tmp_path / 'model.msgpack'
  source.write_bytes(serialization.to_bytes({'optimizer': state}))
  out = tmp_path / 'out'
  ok(run_job(f'{CONVERT}:optimizer/', f'--config.input.path={source}', f'--config.output.path={out}'))
  got = checkpoints.flat_numpy(checkpoints.restore_plain(out))
  assert sorted(got) == sorted(['step', 'opt_state/0/count'] + [
      k.replace('target/', 'params/') for k in old if k.startswith('target/')] + [
      k.replace('state/param_states/', f'opt_state/0/{"mu" if k.endswith("/grad_ema") else "nu"}/')
      .rsplit('/', 1)[0] for k in old if k.startswith('state/param_states/')])
  np.testing.assert_array_equal(got['opt_state/0/nu/Conv_1/kernel'],
                                old['state/param_states/Conv_1/kernel/grad_sq_ema'])
  assert int(got['opt_state/0/count']) == STEP


def test_inspect_lists_a_msgpack_checkpoint(msgpack_dir):
  folder, flat = msgpack_dir
  result = subprocess.run([sys.executable, '-m', 'surgery_job.inspect', str(folder), '--json'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  info = json.loads(result.stdout)
  assert info['format'] == 'flax_msgpack' and info['step'] == STEP
  assert info['params_root'] == 'target'
  assert sorted(info['leaves']) == sorted(flat)
  for key, value in flat.items():
    assert info['leaves'][key]['shape'] == list(np.shape(value))
    assert info['leaves'][key]['dtype'] == np.asarray(value).dtype.name
  assert info['total'] == {'leaves': len(flat), 'bytes': sum(np.asarray(v).nbytes for v in flat.values())}
  older = subprocess.run([sys.executable, '-m', 'surgery_job.inspect', str(folder / 'checkpoint_3')],
                         cwd=REPO, capture_output=True, text=True, check=False)
  assert older.returncode == 0, older.stderr[-2000:]
  assert older.stdout.splitlines()[0] == f'{folder / "checkpoint_3"}: Flax msgpack checkpoint, step 3'


def test_msgpack_keys_that_join_alike_are_refused_naming_both(tmp_path):
  source = tmp_path / 'checkpoint_1'
  source.write_bytes(serialization.to_bytes(
      {'params': {'a/b': np.ones(2, np.float32), 'a': {'b': np.zeros(2, np.float32)}}}))
  result = run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={source}',
                   f'--config.output.path={tmp_path / "out"}')
  assert_bad_input(result, f"{source}: keys ['params']['a']['b'] and ['params']['a/b'] both read "
                           "as 'params/a/b'")
  assert not (tmp_path / 'out').exists()


def _input(path):
  """`config.input` naming `path`, as the job's formats read it."""
  input_config = config_lib.get_default_config().input
  input_config.path = str(path)
  return input_config


def test_msgpack_empty_key_is_refused_by_name(tmp_path):
  source = tmp_path / 'checkpoint_1'
  source.write_bytes(serialization.to_bytes({'params': {'': np.ones(2, np.float32),
                                                        'w': np.ones(2, np.float32)}}))
  with pytest.raises(SurgeryError, match=r"key \['params'\]\[''\] has an empty part"):
    legacy_flax.read_metadata(legacy_flax.locate(_input(source), None))


def test_msgpack_none_and_empty_subtrees_are_kept(tmp_path):
  state = {'params': {'w': np.ones((2, 3), np.float32), 'n': None, 'e': {}},
           'opt': [{'mu': np.ones(3, np.float32)}, None], 'slash/key': np.arange(3)}
  source = tmp_path / 'checkpoint_1'
  source.write_bytes(serialization.to_bytes(state))
  ok(run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={source}',
             f'--config.output.path={tmp_path / "out"}'))
  with ocp.CheckpointManager(tmp_path / 'out') as manager:
    got = manager.restore(1, args=ocp.args.StandardRestore())
  # As Flax wrote it: the list is a dict of its items.
  assert jax.tree.structure(got) == jax.tree.structure(serialization.to_state_dict(state))
  np.testing.assert_array_equal(got['slash/key'], state['slash/key'])
