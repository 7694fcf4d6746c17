"""Bad input ends with one line naming the op and the key, exit code 2, no traceback, and nothing
written: the output path stays absent (or as it was) and the input is untouched. These refusals come
before any data moves: one case of each route the error takes (flag parsing, the config file's
fields, an op, the plan, a path) runs as the real command; the others run in this process through
the command's entry points (`jobs.outcome`), where a SurgeryError is exit 2."""

import hashlib
import shutil
from pathlib import Path

import pytest

from jobs import outcome, run_job, write_config

EMBED_PAD = dict(op='pad', pattern='embed/embedding', axis=0, size=20)

# (transforms or other config fields, extra overrides, expected text of the error line)
CASES = {
    'unknown_op': ({'transforms': [dict(op='frobnicate')]}, [], 'op 0 (frobnicate): unknown op'),
    'unknown_field': ({'transforms': [dict(op='drop', pattern='head/.*', patern='x')]}, [],
                      "op 0 (drop): unknown field 'patern'"),
    'missing_field': ({'transforms': [dict(op='pad', pattern='embed/embedding', axis=0)]}, [],
                      "op 0 (pad): missing field 'size'"),
    'missing_op': ({'transforms': [dict(pattern='x')]}, [], "op 0: missing field 'op'"),
    'unknown_config_field': ({'transforms': [], 'dryrun': True}, [], "unknown field 'dryrun'"),
    'mistyped_override': ({'transforms': []}, ['--config.output.step=abc'], 'output.step'),
    'misspelled_op': ({'transforms': [dict(op='reshap', pattern='head/kernel', shape=[96])]}, [],
                      "op 0 (reshap): unknown op; did you mean 'reshape'? (known: rename, drop, "),
    'pattern_written_as_full_key': (
        {'transforms': [dict(op='drop', pattern='params/head/.*')]}, [],
        "op 0 (drop): pattern 'params/head/.*' matches no parameter; patterns are relative to "
        "params_root 'params'; `/params/head/.*` matches 2 keys"),
    'pattern_matches_nothing': ({'transforms': [EMBED_PAD, dict(op='drop', pattern='nope/.*')]}, [],
                                "op 1 (drop): pattern 'nope/.*' matches no parameter"),
    'rename_collision': ({'transforms': [dict(op='rename', pattern='head/bias', replacement='head/kernel')]}, [],
                         "op 0 (rename): renaming 'head/bias' to 'head/kernel' collides with an existing parameter"),
    'rename_collision_between_renamed': (
        {'transforms': [dict(op='rename', pattern='head/(.*)', replacement='head/w')]}, [],
        "op 0 (rename): 'head/bias' and 'head/kernel' would both become 'head/w'"),
    'pad_smaller': ({'transforms': [EMBED_PAD, dict(op='pad', pattern='embed/embedding', axis=0, size=8)]}, [],
                    "op 1 (pad): cannot pad 'embed/embedding' axis 0 from 20 to smaller size 8"),
    'stack_gap': ({'transforms': [dict(op='drop', pattern='layers_1/.*'),
                                  dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2')]}, [],
                  "op 1 (stack): stack into 'layers/attn/qkv/kernel': layer index 1 is missing (found [0, 2])"),
    'concat_mismatch': ({'transforms': [dict(op='concat', sources=['embed/embedding', 'head/kernel'], axis=0,
                                             target='fused')]}, [],
                        "op 0 (concat): cannot combine into 'fused': mismatched shapes or dtypes: "
                        'embed/embedding (16, 8) float32, head/kernel (8, 12) float32'),
    'unstack_layer_counts_differ': (
        {'transforms': [dict(op='unstack', pattern='layers_0/mlp/(.*)', replacement=r'layers_0/mlp_{i}/\1')]}, [],
        'op 0 (unstack): unstack on axis 0: the leaves it matches do not agree on one layer count: '
        '16 layers: layers_0/mlp/bias; 8 layers: layers_0/mlp/kernel'),
    'stack_count': ({'transforms': [dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2', count=4)]}, [],
                    'op 0 (stack): stack on axis 0: the leaves it matches do not agree on count=4: 3 layers: '
                    'layers/attn/qkv/kernel, layers/mlp/bias, layers/mlp/kernel'),
    'full_key_out_of_params_root': (
        {'transforms': [dict(op='rename', pattern='/params/(head/.*)', replacement=r'/\1')]}, [],
        "op 0 (rename): '/head/bias' would leave params_root 'params', but optimizer state "
        '(opt_state/0/mu) follows it; add drop_optimizer first'),
    'unknown_dtype': ({'transforms': [dict(op='cast', pattern='.*', dtype='float13')]}, [],
                      "op 0 (cast): unknown dtype 'float13'"),
    'mesh_does_not_fit': ({'transforms': [], 'mesh': {'shape': (3, 4), 'axes': ('data', 'model')}}, [],
                          'mesh.shape (3, 4) needs 12 devices, found 8'),
    'rule_with_unknown_axis': ({'transforms': [dict(op='add', path='new/kernel', shape=[8, 4])],
                                'partition_rules': [('new/kernel', (None, 'tensor'))]}, [],
                               "partition_rules[0] ('new/kernel') for 'params/new/kernel': mesh has no axis 'tensor'"),
}


# Run as the command: its exit code and its one line, on each route.
COMMAND_CASES = ('unknown_op', 'unknown_config_field', 'mistyped_override', 'pattern_matches_nothing')


def digest(path: Path) -> str:
  sha = hashlib.sha256()
  for file in sorted(p for p in path.rglob('*') if p.is_file()):
    sha.update(str(file.relative_to(path)).encode())
    sha.update(file.read_bytes())
  return sha.hexdigest()


def assert_bad_input(result, expected: str) -> None:
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('surgery-job: error: '), last
  assert expected in last, last


def assert_refused(text: str, expected: str) -> None:
  """`jobs.outcome` refused with one line holding `expected`: the command's exit 2 and error line."""
  assert text.startswith('error: '), text
  assert '\n' not in text and 'Traceback' not in text, text
  assert expected in text, text


@pytest.mark.parametrize('name', list(CASES))
def test_bad_config(name, layered, tmp_path):
  fields, overrides, expected = CASES[name]
  in_path, _ = layered
  before = digest(in_path)
  out = tmp_path / 'out'
  if name in COMMAND_CASES:
    result = run_job(write_config(tmp_path, fields), f'--config.input.path={in_path}',
                     f'--config.output.path={out}', *overrides)
    assert_bad_input(result, expected)
  else:
    assert not overrides, 'command-line overrides need the command'
    assert_refused(outcome({**fields, 'input': {'path': str(in_path)}, 'output': {'path': str(out)}}),
                   expected)
  assert not out.exists() and not list(tmp_path.glob('out*'))
  assert digest(in_path) == before


def _run_paths(tmp_path, in_path, out):
  return run_job(write_config(tmp_path, {'transforms': []}), f'--config.input.path={in_path}',
                 f'--config.output.path={out}')


def _paths_outcome(in_path, out) -> str:
  """`_run_paths` in this process (`jobs.outcome`)."""
  return outcome({'transforms': [], 'input': {'path': str(in_path)}, 'output': {'path': str(out)}})


def test_missing_input(tmp_path):
  result = _run_paths(tmp_path, tmp_path / 'nowhere', tmp_path / 'out')
  assert_bad_input(result, f'input.path {tmp_path / "nowhere"} does not exist')
  assert not (tmp_path / 'out').exists()


def test_folder_that_is_not_a_checkpoint(tmp_path):
  folder = tmp_path / 'notes'
  folder.mkdir()
  (folder / 'readme.txt').write_text('not a checkpoint')
  assert_refused(_paths_outcome(folder, tmp_path / 'out'), f'input.path {folder} is not an Orbax checkpoint')
  assert not (tmp_path / 'out').exists()


def test_existing_output_step_without_overwrite(layered, tmp_path):
  in_path, _ = layered
  out = tmp_path / 'out'
  shutil.copytree(in_path / '3', out / '3')  # A checkpoint that no run of the job wrote.
  before = digest(out)
  assert_refused(_paths_outcome(in_path, out),
                 f'step 3 of output.path {out} exists; set output.overwrite=True to replace it')
  assert [p.name for p in out.iterdir()] == ['3']
  assert digest(out) == before


def test_output_that_is_a_file(layered, tmp_path):
  out = tmp_path / 'out'
  out.write_text('a file')
  assert_refused(_paths_outcome(layered[0], out), f'output.path {out} is a file')
  assert out.read_text() == 'a file'


def test_output_where_nothing_can_be_written(layered, tmp_path):
  out = Path('/sys/surgery_job_out')  # Refused even to root, as a read-only mount would be.
  result = _run_paths(tmp_path, layered[0], out)
  assert_bad_input(result, f'cannot write beside {out / "3"}: Operation not permitted')
  assert not out.exists()


def test_output_inside_input(layered, tmp_path):
  in_path, _ = layered
  before = digest(in_path)
  out = in_path / 'converted'
  assert_refused(_paths_outcome(in_path, out), f'output.path {out} is inside input.path {in_path}')
  assert not out.exists()
  assert digest(in_path) == before


def test_a_bad_op_is_refused_before_the_input_is_read(tmp_path):
  """The ops are checked before the input path is even looked at."""
  assert_refused(outcome({'transforms': [dict(op='dorp', pattern='x')],
                          'input': {'path': str(tmp_path / 'nowhere')}, 'output': {'path': str(tmp_path / 'out')}}),
                 "op 0 (dorp): unknown op; did you mean 'drop'?")
