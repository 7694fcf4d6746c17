"""Hostile configs, generated: wrong types for every config field and op field, bad values, bad
ops, bad paths, bad meshes, map functions that raise, fail to import or return non-arrays.

Each must end as the command line promises: exit 0 with an output plain Orbax restores, or exit 2
with one `surgery-job: error:` line, no traceback and nothing at or beside output.path. The
refused ones fail before any data moves, so they run here, in this process, through the entry
points the command line uses: `config.with_defaults` (flag parsing) then `job.run`. There a
SurgeryError is exit 2 and any other exception would be exit 1 with a traceback. The valid ones,
and one config of each route the error takes, run as the real command.
"""

import inspect
import typing
from pathlib import Path

import jax
import ml_collections
import pytest

import checkpoints
from jobs import ok, run_job, write_config
from surgery_job import config as config_lib, job, transforms
from surgery_job.errors import SurgeryError
from test_bad_input import assert_bad_input, digest

MAP_MODULE = '''
import jax.numpy as jnp
raise_at_import = False
if raise_at_import:
  raise RuntimeError('broken module')


def raises(x):
  raise ZeroDivisionError('no')


def returns_none(x):
  return None


def returns_text(x):
  return 'text'


def returns_list(x):
  return [x]


def concretizes(x):
  return x * float(x.sum())


def adds_an_axis(x):
  return x[None]


not_a_function = 3
'''

# A valid instance of every op on the layered checkpoint; the generated cases break one field.
VALID_OPS = {
    'rename': dict(pattern='head/bias', replacement='head/b'),
    'drop': dict(pattern='head/bias'),
    'keep': dict(pattern='(embed|head)/.*'),
    'copy': dict(source='head/bias', target='head/bias_copy'),
    'add': dict(path='new/w', shape=[4, 8]),
    'cast': dict(pattern='head/.*', dtype='bfloat16'),
    'reshape': dict(pattern='head/bias', shape=[3, 4]),
    'transpose': dict(pattern='head/kernel', axes=[1, 0]),
    'scale': dict(pattern='head/bias', factor=2.0),
    'pad': dict(pattern='embed/embedding', axis=0, size=20),
    'slice': dict(pattern='embed/embedding', axis=0, start=0, stop=8),
    'stack': dict(pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2'),
    'unstack': dict(pattern='head/kernel', replacement='head/kernel_{i}'),
    'split': dict(source='layers_0/attn/qkv/kernel', axis=1, sizes=[8, 8, 8],
                  targets=['layers_0/attn/q', 'layers_0/attn/k', 'layers_0/attn/v']),
    'concat': dict(sources=['layers_0/mlp/kernel', 'layers_1/mlp/kernel'], axis=0, target='fused'),
    'split_heads': dict(pattern='layers_0/attn/qkv/kernel', axis=1, heads=4),
    'merge_heads': dict(pattern='layers_0/mlp/kernel', axis=0),
    'rotary': dict(pattern='layers_0/mlp/kernel', to='halves'),
    'llama_to_hf': dict(rotary='halves'),
    'llama_from_hf': dict(rotary='halves', scanned=False),
    'map': dict(pattern='head/bias', fn='jax.numpy:negative'),
    'reset_optimizer': dict(pattern='head/.*'),
    'drop_optimizer': dict(),
    'set_step': dict(value=7),
    # Merge ops (test_merge.py runs them on several inputs): here their fields are checked first.
    'average': dict(),
    'ema': dict(decay=0.9),
    'task_arithmetic': dict(base='base'),
    'slerp': dict(a='a', b='b', t=0.5),
    'ties': dict(base='base', density=0.5),
    'dare': dict(base='base', density=0.5),
}

WRONG_VALUES = {str: [3, None], int: ['x', 2.5, True], float: ['x', None], bool: ['yes', 1],
                typing.Sequence[int]: [2560, None, ['a']], typing.Sequence[str]: ['x', [1]]}


def _op_cases() -> dict[str, tuple[list, str]]:
  """(transforms, text the error must hold) per case, from each op's signature."""
  assert set(VALID_OPS) == set(transforms.OPS)
  cases = {}
  for name, factory in transforms.OPS.items():
    valid = VALID_OPS[name]
    hints = typing.get_type_hints(factory)
    for field, parameter in inspect.signature(factory).parameters.items():
      if parameter.default is parameter.empty:
        cases[f'{name}_without_{field}'] = (
            [dict(op=name, **{k: v for k, v in valid.items() if k != field})], f'missing field {field!r}')
      for value in WRONG_VALUES.get(hints.get(field), []):
        cases[f'{name}_{field}_{value!r}'] = ([dict(op=name, **{**valid, field: value})],
                                              f'field {field!r}')
    cases[f'{name}_unknown_field'] = ([dict(op=name, **valid, colour='red')], "unknown field 'colour'")
  return cases


BAD_OP_VALUES = {
    'op_none': ([None], "op 0: expected a dict with an 'op' field"),
    'op_string': (['rename'], "op 0: expected a dict with an 'op' field"),
    'op_name_number': ([dict(op=3)], 'unknown op'),
    'op_name_list': ([dict(op=['drop'], pattern='x')], 'unknown op'),
    'bad_regex': ([dict(op='drop', pattern='(')], 'bad pattern'),
    'no_match': ([dict(op='drop', pattern='nope')], 'matches no parameter'),
    'unknown_dtype': ([dict(op='cast', pattern='.*', dtype='float13')], 'unknown dtype'),
    'dtype_object': ([dict(op='add', path='x', shape=[2], dtype='object')], 'op 0 (add)'),
    'unknown_init': ([dict(op='add', path='x', shape=[2], init='bogus')], 'unknown init'),
    'negative_shape': ([dict(op='add', path='x', shape=[-3, 4])], 'op 0 (add)'),
    'huge_seed': ([dict(op='add', path='x', shape=[2], init='normal', seed=2**70)], 'op 0 (add)'),
    'add_existing': ([dict(op='add', path='head/bias', shape=[2])], 'already exists'),
    'add_too_large': ([dict(op='add', path='x', shape=[10**6, 10**6])], 'not enough memory'),
    'pad_too_large': ([dict(op='pad', pattern='embed/embedding', axis=0, size=10**12)], 'not enough memory'),
    'add_zero_size': ([dict(op='add', path='x', shape=[0, 4])], 'zero-size'),
    'split_zero_size': ([dict(op='split', source='head/bias', axis=0, sizes=[0, 12], targets=['a', 'b'])],
                        'zero-size'),
    'storage_name_collision': ([dict(op='rename', pattern='head/bias', replacement='head.bias'),
                                dict(op='copy', source='head.bias', target='head/bias')],
                               "'params/head.bias' and 'params/head/bias'"),
    'axis_out_of_range': ([dict(op='pad', pattern='embed/embedding', axis=5, size=20)], 'out of range'),
    'reshape_mismatch': ([dict(op='reshape', pattern='head/bias', shape=[5, 5])], 'cannot reshape'),
    'transpose_not_permutation': ([dict(op='transpose', pattern='head/kernel', axes=[0, 0])],
                                  'not a permutation'),
    'slice_empty': ([dict(op='slice', pattern='embed/embedding', axis=0, start=8, stop=2)], 'is empty'),
    'split_sizes': ([dict(op='split', source='head/bias', axis=0, sizes=[5, 5], targets=['a', 'b'])],
                    'add up to'),
    'unstack_without_index': ([dict(op='unstack', pattern='head/kernel', replacement='k')], '{i}'),
    'stack_without_group': ([dict(op='stack', pattern='layers_.*/mlp/bias', replacement='b')],
                            'first group'),
    'rename_onto_existing': ([dict(op='rename', pattern='head/bias', replacement='head/kernel')],
                             'collides'),
    'leaf_and_parent': ([dict(op='add', path='head/bias/x', shape=[2])], 'both a leaf and the parent'),
    'set_step_overflows': ([dict(op='set_step', value=2**40)], "does not fit the int32 'step'"),
    'reset_without_optimizer': ([dict(op='drop_optimizer'), dict(op='reset_optimizer', pattern='.*')],
                                'no optimizer state'),
}

MAP_CASES = {
    'map_not_module_function': ('hostile_fns', "must be 'module:function'"),
    'map_missing_module': ('no_such_module_xyz:f', 'cannot import fn'),
    'map_missing_function': ('hostile_fns:nope', 'cannot import fn'),
    'map_not_callable': ('hostile_fns:not_a_function', 'not callable'),
    'map_module_raises_at_import': ('hostile_broken:raises', 'RuntimeError: broken module'),
    'map_raises': ('hostile_fns:raises', 'ZeroDivisionError: no'),
    'map_returns_none': ('hostile_fns:returns_none', 'not an array'),
    'map_returns_text': ('hostile_fns:returns_text', 'not an array'),
    'map_returns_list': ('hostile_fns:returns_list', 'not an array'),
    'map_concretizes': ('hostile_fns:concretizes', 'op 0 (map)'),
    'map_reshapes_with_moments': ('hostile_fns:adds_an_axis', 'optimizer state cannot follow'),
}

# Config fields: (fields laid over the base config, text the error must hold).
FIELD_CASES = {
    'input_not_a_group': ({'input': 'x'}, "'input' is a group of fields"),
    'output_not_a_group': ({'output': 3}, "'output' is a group of fields"),
    'mesh_not_a_group': ({'mesh': 'x'}, "'mesh' is a group of fields"),
    'unknown_field': ({'colour': 'red'}, "unknown field 'colour'"),
    'unknown_nested_field': ({'input': {'colour': 'red'}}, "unknown field 'input.colour'"),
    'input_path_number': ({'input': {'path': 3}}, 'input.path'),
    'input_path_list': ({'input': {'path': ['a']}}, 'input.path'),
    'input_step_bool': ({'input': {'step': True}}, 'input.step'),
    'input_step_negative': ({'input': {'step': -1}}, 'input.step'),
    'input_step_float': ({'input': {'step': 2.5}}, 'input.step'),
    'input_step_word': ({'input': {'step': 'earliest'}}, 'input.step'),
    'input_step_list': ({'input': {'step': [3, 'x']}}, 'input.step'),
    'input_step_list_missing': ({'input': {'step': [3, 9]}}, 'input.step 9 not found'),
    'input_step_empty_list': ({'input': {'step': []}}, 'input.step'),
    'input_step_missing': ({'input': {'step': 9}}, 'input.step 9 not found'),
    'input_item_number': ({'input': {'item': 3}}, 'input.item'),
    'input_item_missing': ({'input': {'item': 'nope'}}, "input.item 'nope' not found"),
    'output_path_number': ({'output': {'path': 3}}, 'output.path'),
    'output_step_negative': ({'output': {'step': -5}}, 'output.step'),
    'output_step_bool': ({'output': {'step': True}}, 'output.step'),
    'output_step_text': ({'output': {'step': 'x'}}, 'output.step'),
    'output_step_float': ({'output': {'step': 2.5}}, 'output.step'),
    'overwrite_text': ({'output': {'overwrite': 'yes'}}, 'output.overwrite'),
    'overwrite_number': ({'output': {'overwrite': 1}}, 'output.overwrite'),
    'wait_negative': ({'output': {'wait_seconds': -1.0}}, 'output.wait_seconds'),
    'wait_text': ({'output': {'wait_seconds': 'x'}}, 'output.wait_seconds'),
    'lock_timeout_zero': ({'output': {'lock_timeout_seconds': 0.0}}, 'output.lock_timeout_seconds'),
    'mesh_shape_text': ({'mesh': {'shape': 'big'}}, 'mesh.shape'),
    'mesh_shape_mixed': ({'mesh': {'shape': (2, 'x'), 'axes': ('a', 'b')}}, 'mesh.shape'),
    'mesh_shape_bool': ({'mesh': {'shape': (True, 8), 'axes': ('a', 'b')}}, 'mesh.shape'),
    'mesh_shape_misfit': ({'mesh': {'shape': (3, 4), 'axes': ('data', 'model')}}, 'needs 12 devices'),
    'mesh_shape_zero': ({'mesh': {'shape': (0, 8), 'axes': ('data', 'model')}}, 'mesh.shape'),
    'mesh_shape_two_fills': ({'mesh': {'shape': (-1, -1), 'axes': ('data', 'model')}}, 'more than one -1'),
    'mesh_shape_negative': ({'mesh': {'shape': (-2, -4), 'axes': ('data', 'model')}}, 'mesh.shape'),
    'mesh_lengths_differ': ({'mesh': {'shape': (2, 4), 'axes': ('data',)}}, 'differ in length'),
    'mesh_axes_repeated': ({'mesh': {'shape': (2, 4), 'axes': ('data', 'data')}}, "axis 'data' twice"),
    'mesh_axes_numbers': ({'mesh': {'shape': (2, 4), 'axes': (1, 2)}}, 'axis names'),
    'mesh_axes_empty_name': ({'mesh': {'shape': (8,), 'axes': ('',)}}, 'axis names'),
    'mesh_axes_text': ({'mesh': {'axes': 'ab'}}, 'mesh.axes'),
    'mesh_shape_only': ({'mesh': {'shape': (2, 2, 2)}}, 'set both'),
    'budget_text': ({'memory': {'host_budget_gb': 'lots'}}, 'memory.host_budget_gb'),
    'budget_negative': ({'memory': {'host_budget_gb': -1.0}}, 'memory.host_budget_gb'),
    'budget_bool': ({'memory': {'host_budget_gb': True}}, 'memory.host_budget_gb'),
    'params_root_number': ({'params_root': 3}, 'params_root'),
    'params_root_missing': ({'params_root': 'nope'}, "params_root 'nope' holds no leaves"),
    'transforms_text': ({'transforms': 'rename'}, "field 'transforms'"),
    'transforms_dict': ({'transforms': {'op': 'drop'}}, "field 'transforms'"),
    'transforms_number': ({'transforms': 3}, "field 'transforms'"),
    'rules_text': ({'partition_rules': 'x'}, "field 'partition_rules'"),
    'rule_none': ({'partition_rules': [None]}, 'partition_rules[0]'),
    'rule_single': ({'partition_rules': [('a',)]}, 'partition_rules[0]'),
    'rule_bad_regex': ({'partition_rules': [('(', (None,))]}, 'bad regex'),
    'rule_spec_number': ({'partition_rules': [('a', (3,))]}, 'partition_rules[0]'),
    'rule_unknown_axis': ({'transforms': [dict(op='add', path='new/k', shape=[8, 4])],
                           'partition_rules': [('new/k', (None, 'tensor'))]}, "no axis 'tensor'"),
    'rule_does_not_divide': ({'transforms': [dict(op='add', path='new/k', shape=[8, 3])],
                              'partition_rules': [('new/k', (None, 'model'))]}, 'does not divide'),
    'dry_run_text': ({'dry_run': 'yes'}, 'dry_run'),
    'dry_run_number': ({'dry_run': 2}, 'dry_run'),
}

# Hostile but valid: these must run and write an output that plain Orbax restores.
VALID_CASES = {
    'allow_empty_no_match': {'transforms': [dict(op='drop', pattern='nope', allow_empty=True)]},
    'transforms_as_tuple': {'transforms': (dict(op='scale', pattern='head/bias', factor=2),)},
    'mesh_fill': {'mesh': {'shape': (-1,), 'axes': ('data',)}},
    'output_step_zero': {'output': {'step': 0}},
    'latest_step_tiny_budget': {'input': {'step': 'latest'}, 'memory': {'host_budget_gb': 1e-9}},
}


def _path_cases(tmp_path: Path, in_path: Path) -> dict[str, tuple[dict, str]]:
  """Bad input and output paths, made on disk under `tmp_path`."""
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a checkpoint')
  empty = tmp_path / 'empty'
  empty.mkdir()
  return {
      'input_missing': ({'input': {'path': str(tmp_path / 'nowhere')}}, 'does not exist'),
      'input_a_file': ({'input': {'path': str(a_file)}}, 'is a file, not a checkpoint folder'),
      'input_empty_folder': ({'input': {'path': str(empty)}}, 'is not an Orbax checkpoint'),
      'input_a_step_folder': ({'input': {'path': str(in_path / '3')}}, 'is not an Orbax checkpoint'),
      'input_empty_path': ({'input': {'path': ''}}, 'missing field input.path'),
      'output_missing': ({'output': {'path': None}}, 'missing field output.path'),
      'output_inside_input': ({'output': {'path': str(in_path / 'out')}}, 'inside input.path'),
      'output_under_a_file': ({'output': {'path': str(a_file / 'out')}}, 'Not a directory'),
      'input_inside_output': ({'output': {'path': str(in_path.parent)}}, 'inside output.path'),
      'step_for_pytree_input': ({'input': {'path': str(in_path / '3' / 'default')},
                                 'output': {'step': 4}}, 'single PyTree checkpoint'),
  }


@pytest.fixture(autouse=True)
def keep_x64_off():
  """job.run turns on 64-bit JAX for the process; other tests in this process expect it off."""
  yield
  jax.config.update('jax_enable_x64', False)


def outcome(fields: dict) -> str:
  """'ok', or the error line: `fields` run as the command line runs a config file's ConfigDict."""
  try:
    job.run(config_lib.with_defaults(ml_collections.ConfigDict(fields)))
  except SurgeryError as e:
    return f'error: {e}'
  return 'ok'


def _layered_over(base: dict, fields: dict) -> dict:
  merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
  for key, value in fields.items():
    if isinstance(value, dict) and isinstance(merged.get(key), dict):
      merged[key].update(value)
    else:
      merged[key] = value
  return merged


CASES = {**{k: ({'transforms': t}, e) for k, (t, e) in {**_op_cases(), **BAD_OP_VALUES}.items()},
         **{k: ({'transforms': [dict(op='map', pattern='head/bias', fn=fn)]}, e)
            for k, (fn, e) in MAP_CASES.items()},
         **FIELD_CASES}
PATH_CASES = ['input_missing', 'input_a_file', 'input_empty_folder', 'input_a_step_folder',
              'input_empty_path', 'output_missing', 'output_inside_input', 'output_under_a_file',
              'input_inside_output',
              'step_for_pytree_input']


def test_there_are_over_a_hundred():
  assert len(CASES) + len(PATH_CASES) + len(VALID_CASES) >= 100


@pytest.fixture
def map_modules(tmp_path, monkeypatch):
  """hostile_fns (map functions that misbehave) and hostile_broken (raises at import)."""
  modules = tmp_path / 'modules'
  modules.mkdir()
  (modules / 'hostile_fns.py').write_text(MAP_MODULE)
  (modules / 'hostile_broken.py').write_text(MAP_MODULE.replace('= False', '= True'))
  monkeypatch.syspath_prepend(str(modules))
  return modules


def _assert_refused(text: str, expected: str, tmp_path: Path) -> None:
  assert text.startswith('error: '), text
  assert '\n' not in text and 'Traceback' not in text, text
  assert expected in text, text
  assert not list(tmp_path.glob('out*')), text


@pytest.mark.parametrize('name', list(CASES))
def test_hostile_config(name, layered, map_modules, tmp_path):
  fields, expected = CASES[name]
  base = {'input': {'path': str(layered[0])}, 'output': {'path': str(tmp_path / 'out')}}
  _assert_refused(outcome(_layered_over(base, fields)), expected, tmp_path)


@pytest.mark.parametrize('name', PATH_CASES)
def test_hostile_path(name, layered, tmp_path):
  fields, expected = _path_cases(tmp_path, layered[0])[name]
  base = {'input': {'path': str(layered[0])}, 'output': {'path': str(tmp_path / 'out')}}
  before = digest(layered[0])
  _assert_refused(outcome(_layered_over(base, fields)), expected, tmp_path)
  assert digest(layered[0]) == before


@pytest.mark.parametrize('name', list(VALID_CASES))
def test_hostile_but_valid_config(name, layered, tmp_path):
  out = tmp_path / 'out'
  ok(run_job(write_config(tmp_path, VALID_CASES[name]), f'--config.input.path={layered[0]}',
             f'--config.output.path={out}'))
  step = VALID_CASES[name].get('output', {}).get('step', 3)
  restored = checkpoints.flat_numpy(checkpoints.restore_plain(out / str(step) / 'default'))
  assert restored.keys() == layered[1].keys()


# One config per route the error takes, run as the real command (with overrides where the route is
# the command line itself).
ROUTES = {
    'config_file_field': ({'memory': {'host_budget_gb': 'lots'}}, [], 'expects float'),
    'override': ({}, ['--config.mesh.shape=big'], "mesh.shape must hold integers, got ('big',)"),
    'resolve': ({'output': {'step': -5}}, [], 'output.step must be a step number'),
    'op_build': ({'transforms': [dict(op='add', path='x', shape=2560)]}, [],
                 "op 0 (add): field 'shape' expects a list of int, got 2560"),
    'op_trace': ({'transforms': [dict(op='map', pattern='head/bias', fn='hostile_fns:raises')]}, [],
                 'op 0 (map): ZeroDivisionError: no'),
    'map_import': ({'transforms': [dict(op='map', pattern='head/bias', fn='hostile_broken:raises')]},
                   [], 'op 0 (map): cannot import fn'),
    'memory': ({'transforms': [dict(op='add', path='x', shape=[10**6, 10**6])]}, [], 'not enough memory'),
    'plan_check': ({'transforms': [dict(op='add', path='x', shape=[0, 4])]}, [], 'zero-size'),
}


@pytest.mark.parametrize('route', list(ROUTES))
def test_each_route_end_to_end(route, layered, map_modules, tmp_path):
  fields, overrides, expected = ROUTES[route]
  out = tmp_path / 'out'
  result = run_job(write_config(tmp_path, fields), f'--config.input.path={layered[0]}',
                   f'--config.output.path={out}', *overrides,
                   env={'PYTHONPATH': str(map_modules)})
  assert_bad_input(result, expected)
  assert len([line for line in result.stderr.splitlines() if 'surgery-job: error:' in line]) == 1
  assert not list(tmp_path.glob('out*'))


def test_a_config_file_that_raises(layered, tmp_path):
  config_file = tmp_path / 'config.py'
  config_file.write_text('def get_config():\n  raise RuntimeError("no config today")\n')
  result = run_job(config_file, f'--config.input.path={layered[0]}',
                   f'--config.output.path={tmp_path / "out"}')
  assert_bad_input(result, f'cannot load config file {config_file}: RuntimeError: no config today')
  assert not list(tmp_path.glob('out*'))
