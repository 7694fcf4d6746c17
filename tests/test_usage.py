"""What a new user reads first: `surgery-job --help`, the one-line errors before any work starts, and
the README's tables of fields and exit codes, made from the same source as the help."""

import importlib
import subprocess
import sys

import pytest

from jobs import REPO, job_env
from surgery_job import cli, config as config_lib, transforms, usage

# What the job logs once it initializes JAX: none of it may come before a usage error.
JAX_STARTED = ('Unable to initialize backend', 'surgery_job: single process')


def command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'surgery_job', *args], cwd=REPO, env=job_env(),
                        capture_output=True, text=True, timeout=120, check=False)


def test_help_names_every_field_op_ready_config_and_exit_code():
  result = command('--help')
  assert result.returncode == 0, result.stderr
  assert not any(line in result.stderr for line in JAX_STARTED), result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('surgery-job: sharded checkpoint surgery for JAX/Flax/Orbax.')
  assert ('  surgery-job --config=configs/params_only_bf16.py --config.input.path=demo_out/cnn '
          '--config.output.path=demo_out/cnn_serving') in lines
  fields = {line.split()[0]: ' '.join(line.split()) for line in lines
            if ' = ' in line and line.startswith('  ')}
  assert list(fields) == list(config_lib.field_defaults())
  assert fields['output.format'] == ("output.format = 'orbax' `'orbax'`, or `'safetensors'`: the files "
                                     "transformers' `save_pretrained` writes")
  assert fields['input.path'] == ('input.path = required the checkpoint to read: an Orbax '
                                  'CheckpointManager directory or one PyTree checkpoint folder')
  assert fields['transforms'] == 'transforms = [] ordered list of ops, each a dict with an `op` (see Ops)'
  assert '  rename(pattern, replacement, allow_empty=False)' in lines
  assert "  add(path, shape, dtype='float32', init='zeros', value=0.0, stddev=0.02, seed=0)" in lines
  for name in transforms.OPS:
    signature = lines.index(f'  {usage.op_signature(name)}')
    assert lines[signature + 1] == f'      {usage.op_summary(name)}'
  for name in ('identity.py', 'params_only_bf16.py', 'vocab_resize.py'):
    assert any(line.startswith(f'  {name} ') for line in lines), name
  assert '  --heartbeat_timeout_seconds=60  A process silent this long is taken for dead; all stop.' in lines
  assert [line.split()[0] for line in lines[lines.index('Exit codes:') + 1:]] == ['0', '1', '2', '75', '130']


def test_every_field_and_op_has_a_one_line_doc():
  undocumented = sorted(set(config_lib.field_defaults()) - set(config_lib.FIELD_DOCS))
  assert not undocumented, f'add these to config.FIELD_DOCS, then run make readme: {undocumented}'
  assert set(config_lib.FIELD_DOCS) <= set(config_lib.field_defaults())
  assert all(summary and '\n' not in summary for summary, _ in config_lib.FIELD_DOCS.values())
  assert [name for name in transforms.OPS if not usage.op_summary(name)] == []
  assert all(usage.ready_configs().values())


def test_readme_tables_are_the_ones_config_py_makes():
  """`make readme` writes them; an edit of config.py's docs without it fails here."""
  readme = (REPO / 'README.md').read_text()
  assert usage.with_tables(readme) == readme
  assert '| `output.format` | `\'orbax\'` | `\'orbax\'`, or `\'safetensors\'`: ' in readme
  assert '| `input.path` | required | the checkpoint to read: ' in readme


@pytest.mark.parametrize('args, expected', [
    ((), 'surgery-job: error: --config=CONFIG.py is required (surgery-job --help shows the fields, '
         'the ops and an example)'),
    (('--config=nowhere/config.py:7',), 'surgery-job: error: config file nowhere/config.py does not exist'),
    (('--config=configs/identity.py', "--config.transforms=[{'op': 'drop'"),
     "surgery-job: error: flag --config.transforms=[{'op': 'drop': a list field takes a Python or JSON "
     "literal [...]: '{' was never closed"),
])
def test_usage_errors_are_one_line_before_jax_starts(args, expected):
  result = command(*args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [expected]
  assert result.stdout == ''


@pytest.mark.parametrize('module, first_line', [
    ('inspect', '`surgery-job-inspect PATH`: the tree of an Orbax checkpoint from its metadata, no array '
                'data read.'),
    ('diff', "`surgery-job-diff A B`: what differs between two Orbax checkpoints, or between a surgery's "
             'spec'),
    ('report', 'Summarizes the surgery_report.json of a surgery output.'),
])
def test_tool_help_exits_0_with_its_whole_description(module, first_line, capsys):
  tool = importlib.import_module(f'surgery_job.{module}')
  with pytest.raises(SystemExit) as exit_info:
    cli.run(tool.PROG, tool.main, ['--help'])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  assert help_text.startswith(f'usage: {tool.PROG} ')
  description = help_text.split('\n\n')[1]
  assert description.startswith(first_line)
  assert description.endswith('.'), description


def test_list_fields_on_the_command_line(layered, tmp_path):
  """transforms as JSON, partition_rules as a Python literal, over a config file that sets neither."""
  result = command('--config=configs/identity.py', f'--config.input.path={layered[0]}',
                   f'--config.output.path={tmp_path / "out"}', '--config.dry_run=True',
                   '--config.transforms=[{"op": "drop_optimizer"}, {"op": "add", "path": "new/kernel", '
                   '"shape": [8, 4], "init": "ones"}]',
                   "--config.partition_rules=[('new/kernel', (None, 'model'))]")
  assert result.returncode == 0, result.stderr[-3000:]
  planned = [line.strip() for line in result.stdout.splitlines() if line.startswith('  ')]
  new_kernel, = [line for line in planned if line.startswith('params/new/kernel ')]
  assert new_kernel.startswith("params/new/kernel (8, 4) float32 ") and "(None, 'model')" in new_kernel
  assert not [line for line in planned if line.startswith('opt_state/')]
  assert 'op 0 (drop_optimizer)' in result.stdout
  assert not (tmp_path / 'out').exists()


def test_readme_config_example_is_a_config_the_job_takes(tmp_path):
  readme = (REPO / 'README.md').read_text()
  section = readme[readme.index('## Write your own config'):]
  block = section[section.index('    """'):section.index('\nAdd `--config.dry_run')]
  (tmp_path / 'my_surgery.py').write_text('\n'.join(line[4:] for line in block.splitlines()))
  config = cli.load_config(str(tmp_path / 'my_surgery.py'))
  config.input.path, config.dry_run = 'IN', True
  config = config_lib.resolve(config)
  assert [label for label, _ in transforms.build(config.transforms)] == [
      'op 0 (rename)', 'op 1 (add)', 'op 2 (drop_optimizer)', 'op 3 (cast)']
  assert config.partition_rules == [('probe/kernel', (None, 'model'))]
