"""surgery-job-inspect and surgery-job-diff on real checkpoints: one written by 2 processes, one
with optax state, a CheckpointManager with several steps and saves in progress; round trips
through the CLI only, diff-equal to their input."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import write_steps
from jobs import REPO, job_env, launch, ok, run_job, write_config
from surgery_job import cli, diff, inspect, saved_leaves
from test_items import composite  # noqa: F401  (a fixture)

LAYERED_BYTES = 14936  # 12 params (4976 bytes), Adam's mu and nu (4976 each), count and step (4 each).


def normalized(text: str) -> list[str]:
  return [' '.join(line.split()) for line in text.splitlines()]


def tool(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'surgery_job.{module}', *map(str, args)], cwd=REPO,
                        env=job_env(), capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope='module')
def steps(tmp_path_factory):
  """Steps 1 and 2 committed, step 5 an Orbax temporary folder, step 7 a folder with no item yet."""
  path = tmp_path_factory.mktemp('steps') / 'ckpt'
  write_steps.main(str(path), 0, [1, 2], 5)
  (path / '7').mkdir()
  return path


def test_inspect_prints_the_tree_of_an_optax_checkpoint(layered, capsys):
  path, _ = layered
  assert inspect.main([str(path), '--depth', '2']) == 0
  assert normalized(capsys.readouterr().out) == [
      f'{path}: CheckpointManager directory, 1 step folder',
      'step 3 committed <- shown',
      'Step 3 items: default (PyTree)',
      'Custom metadata: {}',
      "Saved mesh: {'data': 2, 'model': 4}",
      'Params root: params; optimizer mirrors: opt_state/0/mu, opt_state/0/nu',
      'opt_state/ 25 leaves, 9.72 KiB',
      '0/ 25 leaves, 9.72 KiB',
      'params/ 12 leaves, 4.86 KiB',
      'embed/ 1 leaf, 512 B',
      'head/ 2 leaves, 432 B',
      'layers_0/ 3 leaves, 1.31 KiB',
      'layers_1/ 3 leaves, 1.31 KiB',
      'layers_2/ 3 leaves, 1.31 KiB',
      'step () int32 P() 4 B',
      f'Total: 38 leaves, 14.59 KiB ({LAYERED_BYTES} bytes)',
  ]
  assert inspect.main([str(path), '--filter', 'layers_1/mlp/kernel']) == 0
  assert normalized(capsys.readouterr().out)[-6:] == [
      'kernel (8, 16) float32 P(\'data\', \'model\') 512 B',
      'params/ 1 leaf, 512 B',
      'layers_1/ 1 leaf, 512 B',
      'mlp/ 1 leaf, 512 B',
      'kernel (8, 16) float32 P(\'data\', \'model\') 512 B',
      'Total: 3 leaves, 1.50 KiB (1536 bytes)']


def test_inspect_json_of_an_optax_checkpoint(layered, capsys):
  path, _ = layered
  assert inspect.main([str(path), '--json']) == 0
  info = json.loads(capsys.readouterr().out)
  assert info['steps'] == [{'step': 3, 'folder': '3', 'state': 'committed'}]
  assert info['step'] == 3 and list(info['items']) == ['default'] and info['items']['default']['pytree']
  assert info['params_root'] == 'params'
  assert info['optimizer_mirrors'] == ['opt_state/0/mu', 'opt_state/0/nu']
  assert info['total'] == {'leaves': 38, 'bytes': LAYERED_BYTES}
  assert info['subtrees']['params'] == {'leaves': 12, 'bytes': 4976}
  assert info['subtrees']['opt_state/0/nu/layers_2'] == {'leaves': 3, 'bytes': 1344}
  assert info['leaves']['params/layers_1/mlp/kernel'] == {
      'shape': [8, 16], 'dtype': 'float32', 'spec': ['data', 'model'], 'bytes': 512}
  assert info['leaves']['opt_state/0/mu/embed/embedding']['spec'] == ['model', None]
  assert info['leaves']['opt_state/0/count'] == {'shape': [], 'dtype': 'int32', 'spec': [], 'bytes': 4}
  filtered = inspect.inspect(str(path), pattern='layers_1/mlp', depth=3)
  assert filtered['total'] == {'leaves': 6, 'bytes': 3 * (512 + 64)}
  assert filtered['subtrees'] == {'opt_state': {'leaves': 4, 'bytes': 1152},
                                  'opt_state/0': {'leaves': 4, 'bytes': 1152},
                                  'opt_state/0/mu': {'leaves': 2, 'bytes': 576},
                                  'opt_state/0/nu': {'leaves': 2, 'bytes': 576},
                                  'params': {'leaves': 2, 'bytes': 576},
                                  'params/layers_1': {'leaves': 2, 'bytes': 576},
                                  'params/layers_1/mlp': {'leaves': 2, 'bytes': 576}}
  assert filtered['leaves'] == {}  # Every match lies deeper than 3 parts.


def test_inspect_lists_committed_steps_and_saves_in_progress(steps, capsys):
  info = inspect.inspect(str(steps))
  assert info['steps'] == [
      {'step': 1, 'folder': '1', 'state': 'committed'},
      {'step': 2, 'folder': '2', 'state': 'committed'},
      {'step': 5, 'folder': '5.orbax-checkpoint-tmp-1234', 'state': 'in progress'},
      {'step': 7, 'folder': '7', 'state': 'in progress (no item yet)'}]
  assert info['step'] == 2 and info['total'] == {'leaves': 38, 'bytes': LAYERED_BYTES}
  assert inspect.main([str(steps), '--step', '1', '--depth', '1']) == 0
  assert normalized(capsys.readouterr().out) == [
      f'{steps}: CheckpointManager directory, 4 step folders',
      'step 1 committed <- shown',
      'step 2 committed',
      'step 5 in progress (5.orbax-checkpoint-tmp-1234)',
      'step 7 in progress (no item yet)',
      'Step 1 items: default (PyTree)',
      'Custom metadata: {}',
      "Saved mesh: {'data': 2, 'model': 4}",
      'Params root: params; optimizer mirrors: opt_state/0/mu, opt_state/0/nu',
      'opt_state/ 25 leaves, 9.72 KiB',
      'params/ 12 leaves, 4.86 KiB',
      'step () int32 P() 4 B',
      f'Total: 38 leaves, 14.59 KiB ({LAYERED_BYTES} bytes)']
  assert inspect.inspect(str(steps / '1'))['step'] == 1  # A step folder names its step.


@pytest.mark.parametrize('args, message', [
    (['{steps}', '--step', '5'], 'step 5 is not a committed step of'),
    (['{steps}/missing'], 'missing does not exist'),
    (['{steps}', '--filter', '('], "--filter '('"),
])
def test_inspect_bad_input_is_one_line_and_exit_2(steps, args, message, capsys):
  assert cli.run(inspect.PROG, inspect.main, [a.format(steps=steps) for a in args]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('surgery-job-inspect: error: ') and message in err


def test_the_files_say_what_orbax_metadata_says(two_process_checkpoint, layered):
  for path in (two_process_checkpoint[0], layered[0]):
    item_dir = path / '3' / 'default'
    assert saved_leaves.read_files(item_dir) == saved_leaves.read_with_orbax(item_dir)


def test_a_damaged_checkpoint_is_named(layered, tmp_path, capsys):
  copy = tmp_path / 'ckpt'
  shutil.copytree(layered[0], copy)
  (copy / '3' / 'default' / '_METADATA').write_text('{"tree_metadata": ')
  assert cli.run(inspect.PROG, inspect.main, [str(copy)]) == 2
  assert cli.run(diff.PROG, diff.main, [str(layered[0]), str(copy)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert [line.split(': ')[:3] for line in err] == [
      ['surgery-job-inspect', 'error', 'damaged checkpoint metadata file '
       f'{copy}/3/default/_METADATA'],
      ['surgery-job-diff', 'error', 'damaged checkpoint metadata file '
       f'{copy}/3/default/_METADATA']]


def test_a_checkpoint_written_by_two_processes(two_process_checkpoint, layered, tmp_path):
  two, _ = two_process_checkpoint
  single, _ = layered
  info = inspect.inspect(str(two))
  assert info['total'] == {'leaves': 38, 'bytes': LAYERED_BYTES}
  assert info['saved_mesh'] == {'data': 2, 'model': 4}
  assert info['leaves'] == inspect.inspect(str(single))['leaves']
  assert diff.main([str(single), str(two), '--values']) == 0
  # The diff itself on 2 processes x 4 devices, as the job runs on a cluster.
  ok(launch(2, str(two), str(single), '--values', '--host_budget_gb=0.00001',
            log_dir=tmp_path / 'logs', command=f'{sys.executable} -m surgery_job.diff'))
  assert (tmp_path / 'logs' / 'process_0.log').read_text().splitlines()[-1] == (
      'EQUAL: 0 only in A, 0 only in B, 0 changed; 38 of 38 leaves bit-equal')


def test_diff_of_two_steps(steps, capsys):
  assert diff.main([str(steps / '1'), str(steps / '2')]) == 0  # Same keys, shapes, dtypes, specs.
  assert normalized(capsys.readouterr().out)[-1] == 'EQUAL: 0 only in A, 0 only in B, 0 changed'
  found = diff.diff(str(steps / '2'), str(steps / '1'), values=True)
  assert not found['equal']
  assert found['values']['step'] == {'equal': False, 'differing': 1, 'size': 1, 'max_abs': 1.0,
                                     'max_rel': 0.5}
  assert found['values']['opt_state/0/count']['equal']  # One optimizer step in both.
  assert found['values']['params/head/kernel']['differing'] == 96
  assert diff.main([str(steps / '1'), str(steps / '2'), '--values']) == 1
  out = normalized(capsys.readouterr().out)
  assert 'bit-equal: opt_state/0/count' in out
  assert 'differs: step: 1 of 1 values, max abs 1, max rel 1' in out
  assert out[-1] == 'DIFFERENT: 0 only in A, 0 only in B, 0 changed; 1 of 38 leaves bit-equal'


@pytest.mark.parametrize('args, message', [
    (['{steps}/1', '{steps}/nope'], 'nope does not exist'),
    (['{steps}/1', '{steps}/2', '--map', '{steps}/none.py'], 'none.py does not exist'),
    (['{steps}/1', '{steps}/2', '--map', 'configs/vocab_resize.py:8'], 'pad'),
])
def test_diff_bad_input_is_one_line_and_exit_2(steps, args, message, capsys):
  assert cli.run(diff.PROG, diff.main, [a.format(steps=steps) for a in args]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('surgery-job-diff: error: ') and message in err
  with pytest.raises(SystemExit) as exit_info:
    diff.main([str(steps)])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == ('surgery-job-diff: error: the following arguments are '
                                     'required: b\n')


PAD = dict(op='pad', pattern='embed/embedding', axis=0, size=24, init='mean')
SLICE = dict(op='slice', pattern='embed/embedding', axis=0, start=0, stop=16)
SPLIT = dict(op='split', source=r'layers_(\d+)/attn/qkv/kernel', axis=1, sizes=[8, 8, 8],
             targets=[r'layers_\1/attn/q/kernel', r'layers_\1/attn/k/kernel', r'layers_\1/attn/v/kernel'])
CONCAT = dict(op='concat', sources=[r'layers_(\d+)/attn/q/kernel', r'layers_(\d+)/attn/k/kernel',
                                    r'layers_(\d+)/attn/v/kernel'], axis=1, target=r'layers_\1/attn/qkv/kernel')


@pytest.mark.parametrize('there, back', [
    ('configs/scan_layers.py:layers', 'configs/unscan_layers.py:layers'),
    ([PAD], [SLICE]),
    ([SPLIT], [CONCAT]),
], ids=['scan_unscan', 'pad_slice', 'split_concat'])
def test_round_trips_through_the_cli_are_diff_equal(there, back, layered, tmp_path):
  source, _ = layered
  configs = [c if isinstance(c, str) else write_config(tmp_path, {'transforms': c}, f'c{i}.py')
             for i, c in enumerate((there, back))]
  middle, end = tmp_path / 'middle', tmp_path / 'end'
  ok(run_job(configs[0], f'--config.input.path={source}', f'--config.output.path={middle}'))
  ok(run_job(configs[1], f'--config.input.path={middle}', f'--config.output.path={end}'))
  result = tool('diff', source, end, '--values')
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines()[-1] == (
      'EQUAL: 0 only in A, 0 only in B, 0 changed; 38 of 38 leaves bit-equal')
  # The conversion checked against its own spec, streamed in small groups.
  result = tool('diff', source, middle, '--values', '--map', configs[0], '--host_budget_gb=0.00001')
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines()[-1].startswith('EQUAL: ')
  assert tool('diff', source, middle).returncode == 1


def test_map_with_a_config_that_does_not_match_differs(layered, tmp_path):
  source, _ = layered
  scanned = tmp_path / 'scanned'
  ok(run_job('configs/scan_layers.py:layers', f'--config.input.path={source}',
             f'--config.output.path={scanned}'))
  assert inspect.inspect(str(scanned))['custom_metadata'] == {'scan_layers': True}
  found = diff.diff(str(source), str(scanned), 'configs/scan_layers.py:layers,1', values=True)
  assert not found['equal'] and not found['only_in_a'] and not found['only_in_b']
  assert found['changed']['params/layers/mlp/kernel'] == {
      'a': {'shape': [8, 3, 16], 'dtype': 'float32', 'spec': "P('data', None, 'model')"},
      'b': {'shape': [3, 8, 16], 'dtype': 'float32', 'spec': "P(None, 'data', 'model')"}}
  assert len(found['changed']) == 9 and len(found['values']) == 11  # Unstacked leaves compare.
  assert all(v['equal'] for v in found['values'].values())
  assert diff.main([str(source), str(scanned), '--map', 'configs/scan_layers.py:layers']) == 0


def test_inspect_a_composite_step_with_a_json_item_and_a_prng_key(composite, capsys):
  path, params, train = composite
  info = inspect.inspect(str(path))
  assert {name: item['pytree'] for name, item in info['items'].items()} == {
      'metadata': False, 'params': True, 'train': True}
  assert info['params_root'] == 'params'
  assert info['optimizer_mirrors'] == ['train/opt_state/0/mu', 'train/opt_state/0/nu']
  saved = {**checkpoints.flat_numpy({'params': params}), **checkpoints.flat_numpy({'train': train})}
  assert info['total'] == {'leaves': len(saved), 'bytes': sum(x.nbytes for x in saved.values())}
  assert info['leaves']['train/rng'] == {'shape': [2], 'dtype': 'uint32', 'spec': [], 'bytes': 8,
                                         'prng_impl': 'threefry2x32'}
  assert inspect.main([str(path), '--filter', 'rng']) == 0
  out = normalized(capsys.readouterr().out)
  assert 'Step 3 items: metadata (copied as is), params (PyTree), train (PyTree)' in out
  assert out[-3:] == ['train/ 1 leaf, 8 B', 'rng key<threefry2x32> data (2,) uint32 P() 8 B',
                      'Total: 1 leaf, 8 B (8 bytes)']


def test_compare_values_on_literal_arrays():
  mesh = checkpoints.mesh_2x4()
  a = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
  pairs = {
      'same': (jnp.asarray(a), jnp.asarray(a)),
      'rounded': (jnp.asarray(a), jnp.asarray(a + np.float32(0.25))),
      'nan_and_signed_zero': (jnp.asarray(a), jnp.asarray(np.array([1.0, np.nan, 3.0, -0.0], np.float32))),
      'ints': (jnp.asarray([5, 7], jnp.int32), jnp.asarray([5, 4], jnp.int32)),
      'bools': (jnp.asarray([True, False]), jnp.asarray([True, False])),
  }
  with jax.enable_x64(True):  # As `diff` runs it.
    found = diff.compare_values(pairs, mesh)
  assert found == {
      'same': {'equal': True, 'differing': 0, 'size': 4, 'max_abs': 0.0, 'max_rel': 0.0},
      'rounded': {'equal': False, 'differing': 4, 'size': 4, 'max_abs': 0.25, 'max_rel': 0.25 / 3},
      # A NaN on one side only is infinitely far; -0.0 differs from 0.0 by its bits, not its value.
      'nan_and_signed_zero': {'equal': False, 'differing': 2, 'size': 4, 'max_abs': float('inf'),
                              'max_rel': float('inf')},
      'ints': {'equal': False, 'differing': 1, 'size': 2, 'max_abs': 3.0, 'max_rel': 3 / 7},
      'bools': {'equal': True, 'differing': 0, 'size': 2, 'max_abs': 0.0, 'max_rel': 0.0},
  }
  assert json.loads(json.dumps(diff._strict_json(found)))['nan_and_signed_zero']['max_abs'] == 'inf'  # pylint: disable=protected-access


@pytest.mark.parametrize('kept', [0.9, 0.99])
def test_a_truncated_manifest_is_one_line(layered, tmp_path, kept):
  copy = tmp_path / 'ckpt'
  shutil.copytree(layered[0], copy)
  manifest = copy / '3' / 'default' / 'manifest.ocdbt'
  manifest.write_bytes(manifest.read_bytes()[:int(manifest.stat().st_size * kept)])
  for result in (tool('inspect', copy), tool('diff', layered[0], copy, '--values')):
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count('\n') == 1, result.stderr[-3000:]
    assert f'{manifest} cannot be read' in result.stderr


def run_tool_leaving_a_task_nobody_awaited(error: str, end: str) -> subprocess.CompletedProcess:
  """A tool whose asyncio task failed with `error` unawaited before the tool ends with `end`."""
  code = ('import asyncio, gc, sys\nfrom surgery_job import cli\nfrom surgery_job.errors import SurgeryError\n'
          f'async def read():\n  raise {error}\n'
          'def main(argv):\n  loop = asyncio.new_event_loop()\n  task = loop.create_task(read())\n'
          '  loop.run_until_complete(asyncio.sleep(0))\n  loop.close()\n  del task\n  gc.collect()\n'
          f'  {end}\n'
          'sys.exit(cli.run("tool", main, []))\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=job_env(),
                        capture_output=True, text=True, timeout=120, check=False)


def test_the_tools_ignore_failed_reads_nobody_awaited():
  # What Orbax leaves when one read of a damaged checkpoint fails first: its siblings' errors.
  result = run_tool_leaving_a_task_nobody_awaited('ValueError("DATA_LOSS: Error decoding manifest")',
                                                  'raise SurgeryError("damaged")')
  assert (result.returncode, result.stderr) == (2, 'tool: error: damaged\n')


def test_other_errors_nobody_awaited_are_still_reported():
  result = run_tool_leaving_a_task_nobody_awaited('KeyError("a bug")', 'return 0')
  assert result.returncode == 0
  assert 'Task exception was never retrieved' in result.stderr and "KeyError: 'a bug'" in result.stderr


def test_the_tools_ignore_reads_completing_into_a_closed_event_loop():
  # What tensorstore does after Orbax gives up on a damaged checkpoint, without the damage's timing.
  code = ('import sys\nfrom surgery_job import cli\nfrom surgery_job.errors import SurgeryError\n'
          'class Read:\n  def __del__(self):\n    raise RuntimeError("Event loop is closed")\n'
          'def main(argv):\n  Read()\n  raise SurgeryError("damaged")\n'
          'sys.exit(cli.run("tool", main, []))\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=120, check=False)
  assert (result.returncode, result.stderr) == (2, 'tool: error: damaged\n')
