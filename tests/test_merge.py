"""Several checkpoints in, one out: the merge ops on real checkpoints (steps of one run, fine-tunes of
one base) compared leaf by leaf with numpy references of mergekit's formulas; bad input refused."""

import importlib.util
import json
import shutil
import signal
import subprocess
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from absl import flags
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from safetensors.numpy import save_file

import checkpoints
from jobs import REPO, job_command, job_env, launch, ok, outcome, run_job, write_config
from surgery_job import main as surgery_main
from surgery_job.transforms import merge as merge_lib
from test_memory import peak_rss
from test_safety import STREAMED, start_paused

STEPS = (10, 20, 30, 40)
CONFIGS = REPO / 'configs'


@pytest.fixture(scope='module')
def run_steps(tmp_path_factory):
  """A CheckpointManager dir of one run's steps (params, Adam state, step) on the 2x4 mesh; each
  step's numpy values."""
  path = tmp_path_factory.mktemp('run') / 'ckpt'
  values = {}
  for step in STEPS:
    state = checkpoints.train_state(checkpoints.layered_params(seed=step), step=step)
    checkpoints.save_manager(path, checkpoints.shard(state, checkpoints.mesh_2x4()), step=step)
    values[step] = checkpoints.flat_numpy(state)
  return path, values


def _fine_tune(params: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(np.float32), params)


@pytest.fixture(scope='module')
def fine_tunes(tmp_path_factory):
  """A base and two fine-tunes of it, each its own CheckpointManager dir (step 1), `b` saved on
  another mesh (1-D, replicated); a checkpoint whose head/kernel has another shape and that has no
  head/bias; {name: (path, numpy values)}."""
  root = tmp_path_factory.mktemp('fine_tunes')
  base = checkpoints.layered_params()
  odd = {**base, 'head': {'kernel': np.zeros((checkpoints.D, 16), np.float32)}}
  found = {}
  for name, params in [('base', base), ('a', _fine_tune(base, 1)), ('b', _fine_tune(base, 2)),
                       ('odd', odd)]:
    state = checkpoints.train_state(params, step=1)
    line = Mesh(np.asarray(jax.devices()[:8]), ('x',))
    placed = (jax.device_put(state, NamedSharding(line, P())) if name == 'b' else
              checkpoints.shard(state, checkpoints.mesh_2x4()))
    checkpoints.save_manager(root / name, placed, step=1)
    found[name] = (root / name, checkpoints.flat_numpy(state))
  return found


def output_values(out, step: int) -> dict:
  return checkpoints.flat_numpy(checkpoints.restore_plain(out / str(step) / 'default'))


def report_of(out, step: int) -> dict:
  return json.loads((out / str(step) / 'surgery_report.json').read_text())


def params_of(values: dict) -> dict:
  return {k: v for k, v in values.items() if k.startswith('params/')}


# numpy references, after mergekit (merge_methods/linear.py, slerp.py,
# generalized_task_arithmetic.py, sparsify.py), in float32.

def ref_average(xs, weights=None):
  weights = np.ones(len(xs), np.float32) if weights is None else np.asarray(weights, np.float32)
  return sum(w * x for w, x in zip(weights, xs)) / weights.sum()


def ref_ema(xs, decay):
  average = xs[0]
  for x in xs[1:]:
    average = decay * average + (1 - decay) * x
  return average


def ref_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
  def normalize(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > eps else v
  dot = np.sum(normalize(v0) * normalize(v1))
  if np.abs(dot) > dot_threshold:
    return (1 - t) * v0 + t * v1
  theta_0 = np.arccos(dot)
  theta_t = theta_0 * t
  return (np.sin(theta_0 - theta_t) * v0 + np.sin(theta_t) * v1) / np.sin(theta_0)


def ref_magnitude(delta, density):
  k = int(density * delta.size)
  mask = np.zeros(delta.size, np.float32)
  mask[np.argsort(-np.abs(delta).ravel(), kind='stable')[:k]] = 1
  return delta * mask.reshape(delta.shape)


def ref_bernoulli_l1(delta, mask):
  masked = delta * mask
  before, after = np.abs(delta).sum(), np.abs(masked).sum()
  return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_gta(base, deltas, weights, consensus, normalize):
  weights = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
  weighted = np.stack(deltas) * weights
  if consensus:
    majority = np.where(weighted.sum(0) >= 0, 1, -1)
    mask = (np.sign(weighted) == majority).astype(np.float32)
    mixed, divisor = (weighted * mask).sum(0), (weights * mask).sum(0)
    divisor[divisor == 0] = 1
  else:
    mixed, divisor = weighted.sum(0), weights.sum(0)
    divisor[np.abs(divisor) < 1e-8] = 1
  return base + (mixed / divisor if normalize else mixed)


def test_average_last_n_follows_a_run(run_steps, tmp_path):
  # configs/average_last_n.py with watch: each step with 3 steps up to it becomes an output step.
  in_path, steps = run_steps
  out = tmp_path / 'out'
  ok(run_job(f'{CONFIGS / "average_last_n.py"}:3', f'--config.input.path={in_path}',
             f'--config.output.path={out}', '--config.watch.enabled=True',
             '--config.watch.poll_seconds=0.1', '--config.watch.idle_timeout_seconds=0.5'))
  assert checkpoints.visible_steps(out) == [30, 40]
  for newest in (30, 40):
    got = output_values(out, newest)
    window = [steps[s] for s in STEPS if newest - 20 <= s <= newest]
    assert sorted(got) == sorted(params_of(steps[newest])) + ['step']  # Optimizer state dropped.
    for key in params_of(got):
      np.testing.assert_allclose(got[key], ref_average([v[key] for v in window]), rtol=1e-6,
                                 err_msg=key)
    assert got['step'] == newest  # From the newest step.
  report = report_of(out, 40)
  assert {name: (i['path'], i['step']) for name, i in report['inputs'].items()} == {
      str(s): (str(in_path), s) for s in STEPS[-3:]}
  assert all(len(i['fingerprint']) == 64 for i in report['inputs'].values())
  assert report['leaves']['params/head/kernel']['inputs'] == ['20', '30', '40']
  assert report['leaves']['params/head/kernel']['sources'] == [
      f'{s}:params/head/kernel' for s in (20, 30, 40)]
  assert report['leaves']['step']['inputs'] == ['40']


def test_a_list_of_steps_keeps_the_optimizer_of_one_and_the_ops_edit_the_merge(run_steps, tmp_path):
  in_path, steps = run_steps
  out = tmp_path / 'out'
  assert outcome({'input': {'path': str(in_path), 'step': [20, 40]}, 'optimizer_from': '20',
                  'transforms': [{'op': 'ema', 'decay': 0.25},
                                 {'op': 'cast', 'pattern': '.*', 'dtype': 'bfloat16'}],
                  'output': {'path': str(out)}}) == 'ok'
  got = output_values(out, 40)
  assert sorted(got) == sorted(steps[40])
  for key, value in got.items():
    if key.startswith('params/'):
      want = ref_ema([steps[20][key], steps[40][key]], 0.25).astype(value.dtype)
      np.testing.assert_array_equal(value, want, err_msg=key)
    elif key.startswith('opt_state/'):
      np.testing.assert_array_equal(value, steps[20][key], err_msg=key)
  assert got['step'] == 40


ALL_OPS = [
    {'op': 'average', 'sources': ['a', 'b'], 'weights': [1.0, 3.0], 'pattern': 'embed/.*'},
    {'op': 'ema', 'sources': ['base', 'a', 'b'], 'decay': 0.9, 'pattern': 'layers_0/.*'},
    {'op': 'task_arithmetic', 'base': 'base', 'sources': ['a', 'b'], 'weights': [0.5, -0.25],
     'pattern': 'layers_1/.*'},
    {'op': 'slerp', 'a': 'a', 'b': 'b', 't': [['.*qkv.*', 0.3], ['.*', 0.7]],
     'pattern': r'layers_2/(attn/.*|mlp/bias)'},
    {'op': 'dare', 'base': 'base', 'sources': ['a', 'b'], 'density': 0.6, 'weights': [0.7, 0.3],
     'seed': 7, 'pattern': 'layers_2/mlp/kernel'},
    {'op': 'ties', 'base': 'base', 'sources': ['a', 'b'], 'density': 0.5, 'weights': [1.0, 0.5],
     'pattern': 'head/.*'},
]


def expected_all_ops(fine_tunes) -> dict:
  """Every params leaf of the ALL_OPS merge, from numpy; the other leaves come from `base`."""
  v = {name: values for name, (_, values) in fine_tunes.items()}
  want = {}
  for key in params_of(v['base']):
    rel = key[len('params/'):]
    base, a, b = v['base'][key], v['a'][key], v['b'][key]
    if rel.startswith('embed/'):
      want[key] = ref_average([a, b], [1.0, 3.0])
    elif rel.startswith('layers_0/'):
      want[key] = ref_ema([base, a, b], 0.9)
    elif rel.startswith('layers_1/'):
      want[key] = ref_gta(base, [a - base, b - base], [0.5, -0.25], False, False)
    elif rel == 'layers_2/mlp/kernel':
      masks = [np.asarray(merge_lib.dare_mask(7, rel, i, base.shape, 0.6)) for i in range(2)]
      deltas = [ref_bernoulli_l1(x - base, m) for x, m in zip([a, b], masks)]
      want[key] = ref_gta(base, deltas, [0.7, 0.3], False, False)
    elif rel.startswith('layers_2/'):
      want[key] = ref_slerp(0.3 if 'qkv' in rel else 0.7, a, b)
    else:
      deltas = [ref_magnitude(x - base, 0.5) for x in (a, b)]
      want[key] = ref_gta(base, deltas, [1.0, 0.5], True, True)
  return want


def all_ops_config(fine_tunes, tmp_path, **fields):
  inputs = {name: {'path': str(fine_tunes[name][0])} for name in ('base', 'a', 'b')}
  return write_config(tmp_path, {'inputs': inputs, 'transforms': ALL_OPS, **fields})


def assert_all_ops(out, fine_tunes) -> None:
  got = output_values(out, 1)
  want = expected_all_ops(fine_tunes)
  assert sorted(got) == sorted(want) + ['step']
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    assert got[key].dtype == np.float32


def test_every_op_matches_numpy_on_fine_tunes(fine_tunes, tmp_path):
  # In this process: test_two_processes_merge_as_one_does runs the same config as a command.
  inputs = {name: {'path': str(fine_tunes[name][0])} for name in ('base', 'a', 'b')}
  assert outcome({'inputs': inputs, 'transforms': ALL_OPS,
                  'output': {'path': str(tmp_path / 'out')}}) == 'ok'
  assert_all_ops(tmp_path / 'out', fine_tunes)
  report = report_of(tmp_path / 'out', 1)
  assert set(report['inputs']) == {'base', 'a', 'b'}
  assert report['inputs']['a']['path'] == str(fine_tunes['a'][0])
  assert report['leaves']['params/layers_1/mlp/kernel']['inputs'] == ['a', 'b', 'base']
  assert [op['op'] for op in report['ops']][:6] == [
      f'op {i} ({op["op"]})' for i, op in enumerate(ALL_OPS)]


@pytest.mark.parametrize('fields, error', [
    ({'transforms': [{'op': 'average', 'sources': ['a', 'odd'], 'pattern': 'head/kernel'}]},
     "op 0 (average): key 'params/head/kernel' is float32[8, 12] in input a but float32[8, 16] in input odd"),
    ({'transforms': [{'op': 'average', 'sources': ['a', 'odd'], 'pattern': 'head/bias'}]},
     "op 0 (average): key 'params/head/bias' is in input a but not in input odd"),
    ({'transforms': [{'op': 'average', 'sources': ['a', 'b'], 'weights': [1.0]}]},
     'op 0 (average): 1 weights for 2 sources (a, b)'),
    ({'transforms': [{'op': 'average', 'weights': [1.0, -1.0, 1.0, 1.0]}]},
     'op 0 (average): weights [1.0, -1.0, 1.0, 1.0] hold -1.0: each weight must be a number of 0 or '
     'more (not NaN)'),
    ({'transforms': [{'op': 'ties', 'base': 'base', 'density': 0.5, 'weights': [float('nan'), 1.0, 1.0]}]},
     'op 0 (ties): weights [nan, 1.0, 1.0] hold nan: each weight must be a number of 0 or more (not NaN)'),
    ({'transforms': [{'op': 'average', 'sources': 'ab'}]},
     "op 0 (average): sources must be a list of input names, got 'ab'"),
    ({'transforms': [{'op': 'average', 'weights': 'x'}]},
     "op 0 (average): weights must be a list of numbers, got 'x'"),
    ({'transforms': [{'op': 'average', 'pattern': 'nothing/.*'}]},
     "op 0 (average): pattern 'nothing/.*' matches no parameter"),
    ({'transforms': [{'op': 'average', 'pattern': '/step'}]},
     "op 0 (average): key 'step' is int32, not a floating-point leaf: leave it out of the pattern"),
    ({'transforms': [{'op': 'ties', 'base': 'base', 'sources': ['a'], 'density': 0.01,
                      'pattern': 'head/bias'}]},
     'op 0 (ties): density 0.01 keeps no entry of a leaf of 12 entries'),
    ({'transforms': [{'op': 'slerp', 'a': 'a', 'b': 'b', 't': 1.5}]},
     'op 0 (slerp): t must be in [0, 1], got 1.5'),
    ({'transforms': [{'op': 'slerp', 'a': 'a', 'b': 'c', 't': 0.5}]},
     "op 0 (slerp): unknown input 'c' (inputs: a, b, base, odd)"),
    ({'transforms': [{'op': 'average'}], 'optimizer_from': 'z'},
     "config: optimizer_from names input 'z', not one of a, b, base, odd"),
    ({'transforms': [{'op': 'cast', 'pattern': '.*', 'dtype': 'bfloat16'}, {'op': 'average'}]},
     'op 1 (average): merge ops come before every other op (they make the tree the others edit)'),
    ({'transforms': [{'op': 'cast', 'pattern': '.*', 'dtype': 'bfloat16'}]},
     'config: 4 inputs but no op combines them (one of: average, ema, task_arithmetic, slerp, ties, '
     'dare)'),
])
def test_bad_merges_are_one_line_and_write_nothing(fields, error, fine_tunes, tmp_path):
  inputs = {name: {'path': str(path)} for name, (path, _) in fine_tunes.items()}
  assert outcome({'inputs': inputs, 'output': {'path': str(tmp_path / 'out')}, **fields}) == (
      f'error: {error}')
  assert not (tmp_path / 'out').exists()


def test_bad_step_forms_and_inputs(run_steps, fine_tunes, tmp_path):
  in_path, _ = run_steps
  out = str(tmp_path / 'out')
  average = [{'op': 'average'}]
  assert outcome({'input': {'path': str(in_path), 'step': [20, 30, 20]}, 'transforms': average,
                  'output': {'path': out}}) == 'error: config: input.step names step 20 twice'
  same = {'a': {'path': str(fine_tunes['a'][0])}, 'again': {'path': str(fine_tunes['a'][0]), 'step': 1}}
  assert outcome({'inputs': same, 'transforms': average, 'output': {'path': out}}) == (
      f'error: inputs a and again are the same checkpoint ({fine_tunes["a"][0] / "1" / "default"})')
  missing = {'a': {'path': str(fine_tunes['a'][0])}, 'b': {'path': str(tmp_path / 'nowhere')}}
  assert outcome({'inputs': missing, 'transforms': average, 'output': {'path': out}}) == (
      f'error: input b: input.path {tmp_path / "nowhere"} does not exist')
  assert outcome({'input': {'path': str(in_path), 'step': 'last:5'}, 'transforms': average,
                  'output': {'path': out}}) == (
      f"error: input.step 'last:5' needs 5 committed steps up to step 40 of {in_path}, found 4: "
      '[10, 20, 30, 40]')
  assert outcome({'input': {'path': str(in_path), 'step': 'last:2'}, 'output': {'path': out}}) == (
      "error: config: input.step 'last:2' names steps to combine, but no op combines them (one of: "
      'average, ema, task_arithmetic, slerp, ties, dare)')
  assert outcome({'input': {'path': str(in_path)}, 'transforms': average, 'output': {'path': out}}) == (
      "error: op 0 (average) combines several inputs, but the config names one: set inputs, or "
      "input.step to 'last:N' or a list of steps")
  assert not (tmp_path / 'out').exists()


def test_two_processes_merge_as_one_does(fine_tunes, tmp_path):
  # The DARE mask is drawn on each process's shards; the reference draws it whole, on one device.
  config = all_ops_config(fine_tunes, tmp_path)
  ok(launch(2, f'--config={config}', f'--config.output.path={tmp_path / "out"}',
            log_dir=tmp_path / 'logs'))
  assert_all_ops(tmp_path / 'out', fine_tunes)


def ready_config(name: str, arg: str, **inputs) -> dict:
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for input_name, path in inputs.items():
    config.inputs[input_name].path = str(path)
  return config.to_dict()


@pytest.mark.parametrize('name,arg,field', [('soup', '3', 'ft2'), ('task_vector', '0.5', 'base'),
                                            ('slerp', '0.5', 'b')])
def test_ready_merge_configs_take_their_inputs_on_the_command_line(name, arg, field):
  # surgery-job's --config flag, on flags of its own: the file laid over the defaults, then overrides.
  argv = ['surgery-job', f'--config={CONFIGS / name}.py:{arg}', f'--config.inputs.{field}.path=run',
          f'--config.inputs.{field}.step=3']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=False,
                                  accept_new_attributes=True, sys_argv=argv)
  parser = flag_values['config'].parser
  parser.parse = surgery_main._lay_over_defaults(parser.parse)
  flag_values(argv)
  assert flag_values.config.inputs[field].to_dict() == {'path': 'run', 'step': 3}


def test_soup_task_vector_and_slerp_configs(fine_tunes, tmp_path):
  v = {name: values for name, (_, values) in fine_tunes.items()}
  paths = {name: path for name, (path, _) in fine_tunes.items()}
  runs = {
      'soup': (ready_config('soup', '2', ft0=paths['a'], ft1=paths['b']),
               lambda key: ref_average([v['a'][key], v['b'][key]]), 'a'),
      'task_vector': (ready_config('task_vector', '0.5', base=paths['base'], ft=paths['a']),
                      lambda key: v['base'][key] + 0.5 * (v['a'][key] - v['base'][key]), 'base'),
      'slerp': (ready_config('slerp', '0.25', a=paths['a'], b=paths['b']),
                lambda key: ref_slerp(0.25, v['a'][key], v['b'][key]), 'a'),
  }
  for name, (config, reference, primary) in runs.items():
    out = tmp_path / name
    assert outcome({**config, 'output': {'path': str(out)}}) == 'ok', name
    got = output_values(out, 1)
    assert sorted(got) == sorted(params_of(v['base'])) + ['step']
    for key in params_of(got):
      np.testing.assert_allclose(got[key], reference(key), rtol=2e-5, atol=1e-6, err_msg=f'{name} {key}')
    assert got['step'] == v[primary]['step']


def two_large_steps(path, rows: int) -> dict:
  """Steps 1 and 2 of six float32 (rows, 1024) params on the 2x4 mesh; their numpy values."""
  sharding = NamedSharding(checkpoints.mesh_2x4(), P('data', 'model'))
  values = {}
  for step in (1, 2):
    rng = np.random.default_rng(step)
    params = {f'layer_{i}': {'w': rng.standard_normal((rows, 1024), np.float32)} for i in range(6)}
    checkpoints.save_manager(path, {'params': jax.device_put(params, sharding),
                                    'step': np.asarray(step, np.int32)}, step=step)
    values[step] = params
  return values


def test_a_merge_streams_in_a_budget_smaller_than_one_input(tmp_path):
  # Each group reads one leaf of both steps (2 x 16 MiB) and writes one (16 MiB): 0.05 GB in a
  # budget of 0.06 GB, where one input is 0.1 GB and restoring both to average them 0.2 GB. The
  # runtime's fixed cost is the same merge of a tiny checkpoint.
  config = write_config(tmp_path, {'input': {'step': 'last:2'}, 'transforms': [{'op': 'average'}]})
  two_large_steps(tmp_path / 'tiny', rows=8)
  large = two_large_steps(tmp_path / 'large', rows=4096)
  fixed = peak_rss(config, f'--config.input.path={tmp_path / "tiny"}',
                   f'--config.output.path={tmp_path / "tiny_out"}')
  budget = 0.06e9
  peak = peak_rss(config, f'--config.input.path={tmp_path / "large"}',
                  f'--config.output.path={tmp_path / "out"}', f'--config.memory.host_budget_gb={budget / 1e9}')
  assert [g['outputs'] for g in report_of(tmp_path / 'out', 2)['groups'] if g['outputs'] != ['step']] == [
      [f'params/layer_{i}/w'] for i in range(6)]
  assert peak - fixed <= 1.5 * budget, f'{(peak - fixed) / 1e6:.0f} MB over the runtime'
  got = output_values(tmp_path / 'out', 2)
  for i in range(6):
    key = f'params/layer_{i}/w'
    np.testing.assert_allclose(got[key], ref_average([large[1][f'layer_{i}']['w'], large[2][f'layer_{i}']['w']]),
                               rtol=1e-6, err_msg=key)


def test_a_stopped_merge_resumes(run_steps, tmp_path):
  in_path, steps = run_steps
  config = write_config(tmp_path, {'input': {'step': 'last:3'}, 'transforms': [{'op': 'average'}]})
  out, pause = tmp_path / 'out', tmp_path / 'paused'
  process = start_paused(config, in_path, out, 'group_written', pause, STREAMED)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  pause.unlink()
  assert checkpoints.visible_steps(out) == []
  result = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED)
  ok(result)
  groups = len(report_of(out, 40)['groups'])
  assert f'Resuming: 1 of {groups} groups were written by an earlier run' in result.stderr
  assert report_of(out, 40)['groups_reused'] == [0]
  got = output_values(out, 40)
  for key in params_of(got):
    np.testing.assert_allclose(got[key], ref_average([steps[s][key] for s in (20, 30, 40)]),
                               rtol=1e-6, err_msg=key)


def test_the_dry_run_of_a_range_of_steps_names_each_and_its_memory(run_steps, capsys):
  in_path, _ = run_steps
  assert outcome({'input': {'path': str(in_path), 'step': range(20, 41, 20)},
                  'transforms': [{'op': 'average'}], 'dry_run': True}) == 'ok'
  printed = capsys.readouterr().out
  assert f'Input 20: {in_path / "20" / "default"} (step 20)' in printed
  assert f'Input 40: {in_path / "40" / "default"} (step 40)' in printed
  assert 'Each group reads its keys of all 2 inputs together: about 2 times the memory' in printed
  assert '  params/head/kernel (8, 12) float32 P(None, \'model\') from 20:params/head/kernel, ' \
         '40:params/head/kernel' in printed


def test_a_plain_run_reads_keys_holding_a_colon(tmp_path):
  # Keys of several inputs are `name:key` in the plan; those of the one input of a plain run are not.
  state = {'params': {'w': np.arange(8, dtype=np.float32)}, 'ema:decay': np.asarray(0.5, np.float32)}
  checkpoints.save_manager(tmp_path / 'in', state, step=1)
  assert outcome({'input': {'path': str(tmp_path / 'in')},
                  'output': {'path': str(tmp_path / 'out')}}) == 'ok'
  got = output_values(tmp_path / 'out', 1)
  np.testing.assert_array_equal(got['ema:decay'], 0.5)
  np.testing.assert_array_equal(got['params/w'], state['params']['w'])


def test_inputs_of_other_formats_merge(fine_tunes, tmp_path):
  # A safetensors file (names joined with '.') and a Flax msgpack file of the same params.
  a, b = (params_of(fine_tunes[name][1]) for name in ('a', 'b'))
  save_file({k[len('params/'):].replace('/', '.'): v for k, v in a.items()}, tmp_path / 'a.safetensors')
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'checkpoint_1').write_bytes(serialization.to_bytes(
      traverse_util.unflatten_dict({k[len('params/'):]: v for k, v in b.items()}, sep='/')))
  assert outcome({'inputs': {'a': {'path': str(tmp_path / 'a.safetensors')},
                             'b': {'path': str(tmp_path / 'b' / 'checkpoint_1')}},
                  'transforms': [{'op': 'average'}], 'output': {'path': str(tmp_path / 'out')}}) == 'ok'
  got = checkpoints.flat_numpy(checkpoints.restore_plain(tmp_path / 'out'))
  assert sorted(got) == sorted(k[len('params/'):] for k in a)
  for key, value in got.items():
    np.testing.assert_allclose(value, ref_average([a['params/' + key], b['params/' + key]]),
                               rtol=1e-6, err_msg=key)


def test_each_leaf_is_computed_wide_and_cast_back_to_its_dtype(tmp_path):
  # bfloat16 in float32; float64 in float64, where float32 would lose the third value's digits.
  rng = np.random.default_rng(0)
  steps = {}
  for step in (1, 2, 3):
    params = {'half': rng.standard_normal(16).astype(ml_dtypes.bfloat16),
              'wide': 1 + rng.standard_normal(16) * 1e-12}
    checkpoints.save_manager(tmp_path / 'in', {'params': params}, step=step)
    steps[step] = params
  assert outcome({'input': {'path': str(tmp_path / 'in'), 'step': 'last:3'},
                  'transforms': [{'op': 'average'}], 'output': {'path': str(tmp_path / 'out')}}) == 'ok'
  with jax.enable_x64(True):  # As the job reads and writes them.
    got = output_values(tmp_path / 'out', 3)
  assert got['params/half'].dtype == ml_dtypes.bfloat16 and got['params/wide'].dtype == np.float64
  half = sum(steps[s]['half'].astype(np.float32) for s in steps) / np.float32(3)
  np.testing.assert_array_equal(got['params/half'], half.astype(ml_dtypes.bfloat16))
  np.testing.assert_allclose(got['params/wide'], sum(steps[s]['wide'] for s in steps) / 3, rtol=1e-15)


def test_a_watched_average_whose_oldest_step_the_trainer_deletes_is_skipped(run_steps, tmp_path):
  in_path, out, pause = tmp_path / 'in', tmp_path / 'out', tmp_path / 'paused'
  shutil.copytree(run_steps[0], in_path)
  config = write_config(tmp_path, {'input': {'step': 'last:2'}, 'transforms': [{'op': 'average'}],
                                   'watch': {'enabled': True, 'poll_seconds': 0.1,
                                             'idle_timeout_seconds': 0.5}})
  watcher = subprocess.Popen(
      job_command(config, f'--config.input.path={in_path}', f'--config.output.path={out}'),
      cwd=REPO, env=job_env(env={'SURGERY_JOB_PAUSE': 'restore', 'SURGERY_JOB_PAUSE_FILE': str(pause)}),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for output_step in (20, 30, 40):  # Step 10 goes while step 20's average reads it.
    deadline = time.monotonic() + 120
    while not pause.exists():
      assert watcher.poll() is None and time.monotonic() < deadline, watcher.stderr.read()[-3000:]
      time.sleep(0.1)
    if output_step == 20:
      shutil.rmtree(in_path / '10')  # As the trainer's max_to_keep does.
    pause.unlink()
  stderr = watcher.communicate(timeout=300)[1]
  assert watcher.returncode == 0, stderr[-3000:]
  assert ('Skipping input step 20: step 10, one of the steps it averages, is no longer a committed '
          'step of the input') in stderr
  assert checkpoints.visible_steps(out) == [30, 40]
