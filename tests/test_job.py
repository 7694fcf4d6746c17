"""The job as a whole: the guide's round trip, other meshes, NNX state, dry runs and overwrite."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from jobs import REPO, ok, run_job, surgery, write_config
from surgery_job import example, output
from test_bad_input import digest

STACK = dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2')


def test_identity_round_trip_of_the_guide_cnn(tmp_path):
  mesh = checkpoints.mesh_2x4()
  state = example.example_state(mesh)
  checkpoints.save_manager(tmp_path / 'in', state, step=1)
  out = tmp_path / 'out'
  ok(run_job(REPO / 'configs' / 'identity.py', f'--config.input.path={tmp_path / "in"}',
             f'--config.output.path={out}'))
  # The guide's target: the abstract params and `tx.init` of them, restored with plain Orbax.
  abstract_params = jax.eval_shape(lambda: example.CNN().init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))['params'])
  target = {'params': abstract_params, 'opt_state': jax.eval_shape(optax.adam(1e-3).init, abstract_params),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  target = jax.tree_util.tree_map_with_path(lambda p, s: jax.ShapeDtypeStruct(
      s.shape, s.dtype, sharding=NamedSharding(mesh, example_spec(p))), target)
  restored = ocp.StandardCheckpointer().restore(out / '1' / 'default', target)
  want, got = checkpoints.flat_numpy(state), checkpoints.flat_numpy(restored)
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  saved = checkpoints.saved_specs(out / '1' / 'default')
  for key in want:
    assert saved[key] == checkpoints.normalized(example_spec_of(key)), key


def example_spec_of(key: str) -> P:
  return next((s for suffix, s in example.SPECS.items() if key.endswith(suffix)), P())


def example_spec(path) -> P:
  return example_spec_of(jax.tree_util.keystr(path, simple=True, separator='/'))


def test_job_on_four_devices_and_restore_on_a_1x4_mesh(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'out'
  config = write_config(tmp_path, {'transforms': [STACK]})
  ok(run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', devices=4))
  item_dir = out / '3' / 'default'
  saved = checkpoints.saved_specs(item_dir)
  assert saved['params/layers/mlp/kernel'] == P(None, 'data', 'model')
  assert saved['params/embed/embedding'] == P('model')
  npz = tmp_path / 'restored.npz'
  result = subprocess.run(
      [sys.executable, str(REPO / 'tests' / 'restore_on_mesh.py'), str(item_dir), str(npz), '1', '4'],
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  got = dict(np.load(npz))
  for i_key in ('params', 'opt_state/0/mu', 'opt_state/0/nu'):
    np.testing.assert_array_equal(
        got[f'{i_key}/layers/mlp/kernel'], np.stack([x[f'{i_key}/layers_{i}/mlp/kernel'] for i in range(3)]))
  np.testing.assert_array_equal(got['params/head/kernel'], x['params/head/kernel'])
  np.testing.assert_array_equal(got['opt_state/0/count'], x['opt_state/0/count'])


def test_configured_mesh_reshards_onto_it(layered, tmp_path):
  in_path, x = layered
  out, result = surgery(tmp_path, in_path, [dict(op='transpose', pattern='head/kernel', axes=[1, 0])],
                        mesh={'shape': (4, -1), 'axes': ('model', 'data')})
  ok(result)
  item_dir = out / '3' / 'default'
  saved = checkpoints.saved_specs(item_dir)
  assert saved['params/layers_0/mlp/kernel'] == P('data', 'model')
  assert saved['params/head/kernel'] == P('model')
  metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
  assert list(metadata['params']['head']['kernel'].sharding.shape) == [4, 2]
  got = checkpoints.flat_numpy(checkpoints.restore_plain(item_dir))
  np.testing.assert_array_equal(got['params/head/kernel'], x['params/head/kernel'].T)


class Encoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, name: str = 'linear'):
    setattr(self, name, nnx.Linear(4, 8, rngs=rngs))
    self.out = nnx.Linear(8, 2, rngs=rngs)


def test_nnx_state_checkpoint(tmp_path):
  model = Encoder(nnx.Rngs(0))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'in', nnx.state(model))
  out, result = surgery(tmp_path, tmp_path / 'in', [
      dict(op='rename', pattern='linear/(.*)', replacement=r'encoder/\1'),
      dict(op='cast', pattern='.*kernel/value', dtype='bfloat16')])
  ok(result)
  # Restore into the new module's abstract state, as an NNX user would.
  abstract = nnx.eval_shape(lambda: Encoder(nnx.Rngs(0), name='encoder'))
  target = jax.tree_util.tree_map_with_path(lambda p, s: jax.ShapeDtypeStruct(
      s.shape, jnp.bfloat16 if 'kernel' in jax.tree_util.keystr(p) else s.dtype), nnx.state(abstract))
  restored = ocp.StandardCheckpointer().restore(out, target)
  np.testing.assert_array_equal(np.asarray(restored['encoder']['kernel'][...]),
                                np.asarray(model.linear.kernel[...].astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(restored['encoder']['bias'][...]), np.asarray(model.linear.bias[...]))
  np.testing.assert_array_equal(np.asarray(restored['out']['bias'][...]), np.asarray(model.out.bias[...]))


def test_dry_run_prints_the_plan_and_writes_nothing(layered, tmp_path):
  in_path, _ = layered
  out, result = surgery(tmp_path, in_path, [STACK], dry_run=True)
  ok(result)
  assert "params/layers/mlp/kernel (3, 8, 16) float32 P(None, 'data', 'model') from " in result.stdout
  assert "op 0 (stack)" in result.stdout
  assert not out.exists() and not list(tmp_path.glob('out*'))


def test_overwrite_replaces_its_own_step_only(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'out'
  shutil.copytree(in_path / '3', out / '5')  # Another step, which stays as it is.
  (out / '9').mkdir(parents=True)
  shutil.copytree(in_path / '3' / 'default', out / '9' / 'old')  # An older checkpoint step.
  before = digest(out / '5')
  config = write_config(tmp_path, {'transforms': [dict(op='set_step', value=9)], 'output': {'overwrite': True, 'step': 9}})
  ok(run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}'))
  assert sorted(p.name for p in out.iterdir()) == ['5', '9', output.RECORD] and digest(out / '5') == before
  # The same surgery again: overwrite asks for it to run again, not for 'already done'.
  report = out / '9' / 'surgery_report.json'
  first = report.stat().st_ino
  again = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}')
  ok(again)
  assert again.stdout.startswith(f'Wrote {out}/9: ') and report.stat().st_ino != first
  assert sorted(p.name for p in (out / '9').iterdir()) == ['_CHECKPOINT_METADATA', 'commit_success.txt', 'default',
                                                           'surgery_report.json']
  with ocp.CheckpointManager(out, item_names=('default',)) as manager:
    assert manager.all_steps() == [5, 9]
    restored = manager.restore(9, args=ocp.args.Composite(default=ocp.args.StandardRestore()))
  assert int(restored['default']['step']) == 9
  with ocp.CheckpointManager(out) as manager:  # The plainest read: no item names, no args.
    assert int(manager.restore(manager.latest_step())['step']) == 9
  np.testing.assert_array_equal(np.asarray(restored['default']['params']['head']['kernel']), x['params/head/kernel'])


def test_single_pytree_checkpoint_in_and_out(layered, tmp_path):
  _, x = layered
  state = checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()), checkpoints.mesh_2x4())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'in', state)
  out, result = surgery(tmp_path, tmp_path / 'in', [dict(op='drop_optimizer')])
  ok(result)
  got = checkpoints.flat_numpy(checkpoints.restore_plain(out))
  assert sorted(got) == sorted(k for k in x if not k.startswith('opt_state/'))
  np.testing.assert_array_equal(got['params/embed/embedding'], x['params/embed/embedding'])


def test_the_step_keeps_its_custom_metadata_and_handler_names(tmp_path):
  state = checkpoints.shard(checkpoints.train_state(checkpoints.layered_params()), checkpoints.mesh_2x4())
  with ocp.CheckpointManager(tmp_path / 'in') as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)),
                 custom_metadata={'scan_layers': False, 'run': 'r1'})
    manager.wait_until_finished()
  out = tmp_path / 'out'
  ok(run_job(REPO / 'configs' / 'scan_layers.py', f'--config.input.path={tmp_path / "in"}',
             f'--config.output.path={out}', '--config.output.custom_metadata.owner=eval'))
  with ocp.CheckpointManager(out) as manager:
    metadata = manager.metadata(3)
    assert metadata.custom_metadata == {'scan_layers': True, 'run': 'r1', 'owner': 'eval'}
    assert metadata.item_handlers == {
        'state': 'orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler'}
    restored = manager.restore(3)
  np.testing.assert_array_equal(np.asarray(restored['state']['params']['layers']['mlp']['bias'])[1],
                                np.asarray(state['params']['layers_1']['mlp']['bias']))


def test_custom_metadata_needs_a_step(tmp_path):
  state = checkpoints.train_state(checkpoints.layered_params())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'in', state)
  result = run_job(REPO / 'configs' / 'identity.py', f'--config.input.path={tmp_path / "in"}',
                   f'--config.output.path={tmp_path / "out"}', '--config.output.custom_metadata.a=1')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'surgery-job: error: output.custom_metadata is set but the input is a single PyTree '
      'checkpoint, which has no step to record it in')
