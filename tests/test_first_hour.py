"""A new user's first hour: `make demo` in a fresh folder, quiet, each step ending with what it
wrote; the README's commands run as written: the ready configs on their example checkpoints."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import checkpoints
from jobs import REPO

VENV = Path(sys.prefix)
# As in a user's shell: no fake devices or platform set (the Makefile and the README set them).
USER_ENV = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
  """A folder as a fresh clone has it once `make setup` has run (this test's own venv)."""
  if not (VENV / 'installed').exists() or VENV.parent != REPO:
    why = 'needs the venv `make setup` made, which make would otherwise rebuild'
    if os.environ.get('CI'):
      pytest.fail(why)
    pytest.skip(why)
  folder = tmp_path_factory.mktemp('clone')
  for name in ('configs', 'setup.py', 'Makefile', '.venv'):
    (folder / name).symlink_to(REPO / name)
  return folder


@pytest.fixture(scope='module')
def demo(clone):
  """What `make demo` printed in `clone`: one list of lines per command it ran, and its stderr."""
  made = subprocess.run(['make', 'demo'], cwd=clone, env=USER_ENV, capture_output=True, text=True,
                        timeout=600, check=False)
  assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
  steps, lines = {}, None
  for line in made.stdout.splitlines():  # make echoes each command; stderr has what they logged.
    if line.startswith(('rm ', '.venv/bin/')):
      lines = steps.setdefault(line.split()[0].split('/')[-1] + ' ' + line.split()[1], [])
    elif lines is not None and not line.startswith(' '):  # Not an echoed command's next line.
      lines.append(line)
  return steps, made.stderr


def readme_block(section: str) -> list[str]:
  """The lines of the first indented code block in the README's `## section`."""
  text = (REPO / 'README.md').read_text()
  body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'((?:\n    [^\n]*)+)', body).group(1)
  return [line[4:] for line in block.strip('\n').splitlines()]


def report(unit: Path) -> dict:
  return json.loads((unit / 'surgery_report.json').read_text())


def test_make_demo_is_quiet_and_says_what_it_wrote(demo):
  steps, stderr = demo
  assert steps['python -m'] == ['Wrote the example CNN checkpoint (params, Adam state, step) to demo_out/cnn']
  assert steps['surgery-job --config=configs/params_only_bf16.py'] == [
      'Wrote demo_out/cnn_serving/1: 9 leaves, 1.57 MiB, validated '
      '(report: demo_out/cnn_serving/1/surgery_report.json)']
  logged = stderr.splitlines()
  assert len(logged) <= 10, stderr
  for noise in ('Unable to initialize backend', 'orbax', 'Cast params/', 'preemption'):
    assert noise not in stderr
  assert sum(line.split('] ', 1)[-1].startswith('Cast 8 leaves: ') for line in logged) == 1


def test_every_ready_config_runs_on_its_example_as_the_readme_shows(clone):
  commands = readme_block('Ready configs')
  outputs = [re.search(r'--config\.output\.path=(\S+)', c).group(1) for c in commands
             if c.startswith('.venv/bin/surgery-job ')]
  configs = {re.search(r'configs/(\w+)\.py', c).group(1) for c in commands if 'configs/' in c}
  assert configs == {p.stem for p in (REPO / 'configs').glob('*.py')} - {'identity', 'params_only_bf16'}
  ran = subprocess.run(['bash', '-ec', '\n'.join(commands)], cwd=clone, env=USER_ENV,
                       capture_output=True, text=True, timeout=900, check=False)
  assert ran.returncode == 0, ran.stderr[-3000:]
  wrote = [line for line in ran.stdout.splitlines() if line.startswith('Wrote examples/')]
  steps = {out: OUTPUT_STEPS.get(out, 1) for out in outputs}
  assert [line.split(':')[0] for line in wrote] == [f'Wrote {out}/{steps[out]}' for out in outputs]
  leaves = {out: report(clone / out / str(steps[out]))['leaves'] for out in outputs}
  assert leaves['examples/scanned']['params/layers/attn/query/kernel']['shape'] == [4, 64, 64]
  assert leaves['examples/unscanned']['params/layers_3/mlp/up/kernel']['shape'] == [64, 256]
  assert leaves['examples/fused_qkv']['params/layers_0/attn/qkv/kernel']['shape'] == [64, 192]
  assert leaves['examples/vocab_512']['params/embed/embedding']['shape'] == [512, 64]
  assert leaves['examples/vocab_512']['params/lm_head/kernel']['shape'] == [64, 512]
  assert leaves['examples/cls_head']['params/cls/kernel']['shape'] == [64, 2]
  assert leaves['examples/optax']['opt_state/0/nu/Dense_0/kernel']['shape'] == [3136, 256]
  assert (clone / 'examples/safetensors/1/model.safetensors').is_file()
  check_llama_outputs(clone / 'examples', leaves)


# Outputs not numbered 1: the export of step 3, the average at the newest step, the import at 0.
OUTPUT_STEPS = {'examples/llama_hf': 3, 'examples/llama_average': 3, 'examples/llama_maxtext': 0}


def check_llama_outputs(examples: Path, leaves: dict) -> None:
  """The six Llama and merge outputs against the run's three steps read with plain Orbax."""
  def restored(name: str, step: int) -> dict[str, np.ndarray]:
    return checkpoints.flat_numpy(checkpoints.restore_plain(examples / f'llama_{name}/{step}/items'))
  run = [restored('run', step) for step in (1, 2, 3)]
  params = [k for k in run[0] if k.startswith('params/')]
  hf_names = {'lm_head.weight', 'model.embed_tokens.weight', 'model.norm.weight'} | {
      f'model.layers.{i}.{name}' for i in range(2) for name in (
          'input_layernorm.weight', 'post_attention_layernorm.weight', 'mlp.gate_proj.weight',
          'mlp.up_proj.weight', 'mlp.down_proj.weight', *(f'self_attn.{p}_proj.weight' for p in 'qkvo'))}
  assert set(safetensors.numpy.load_file(examples / 'llama_hf/3/model.safetensors')) == hf_names
  config = json.loads((examples / 'llama_hf/3/config.json').read_text())
  assert {k: config[k] for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                                 'num_key_value_heads', 'head_dim', 'intermediate_size')} == {
      'vocab_size': 256, 'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,
      'num_key_value_heads': 2, 'head_dim': 16, 'intermediate_size': 128}
  # Imported back: the run's params, same keys and shapes, and the step MaxText's loader reads.
  imported = leaves['examples/llama_maxtext']
  assert {k: v['shape'] for k, v in imported.items()} == {
      'step': [], **{k: list(run[2][k].shape) for k in params}}
  merged = {name: restored(name, OUTPUT_STEPS.get(f'examples/llama_{name}', 1))
            for name in ('average', 'soup', 'task_vector', 'slerp')}
  for key in params:
    mean = np.mean([steps[key] for steps in run], axis=0)
    np.testing.assert_allclose(merged['average'][key], mean, rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(merged['soup'][key], mean, rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(merged['task_vector'][key], run[0][key] + 0.5 * (run[2][key] - run[0][key]),
                               rtol=1e-6, atol=1e-7, err_msg=key)
  assert merged['average']['step'] == 3 and merged['soup']['step'] == 1
  assert set(merged['slerp']) == set(params) | {'step'}


def walk_through() -> list[tuple[str, list[str]]]:
  """(command, the output the README shows for it) of every `$ ` line of the walk-through."""
  text = (REPO / 'README.md').read_text()
  body = text.split('\n## Walk-through', 1)[1].split('\n## ', 1)[0]
  steps = []
  for block in re.findall(r'((?:\n    [^\n]*)+)', body):
    lines = [line[4:] for line in block.strip('\n').splitlines()]
    while lines and lines[0].startswith('$ '):
      command = lines.pop(0)[2:]
      while command.endswith('\\'):
        command = command[:-1] + lines.pop(0).strip()
      shown = []
      while lines and not lines[0].startswith('$ '):
        shown.append(lines.pop(0))
      steps.append((command, shown))
  return steps


def matches(shown: list[str], printed: list[str]) -> bool:
  """Whether `printed` is what `shown` shows: a line `...` stands for any lines, `...` in a line for
  any text, `I ...] ` for an absl log line's prefix."""
  if not shown:
    return not printed
  if shown[0] == '...':
    return any(matches(shown[1:], printed[i:]) for i in range(len(printed) + 1))
  pattern = '.*'.join(map(re.escape, shown[0].split('...')))
  return bool(printed) and re.fullmatch(pattern, printed[0]) is not None and matches(shown[1:], printed[1:])


def test_the_walk_through_runs_as_written_after_make_demo(clone, demo):
  del demo  # What it made is there; the walk-through starts over as make demo does.
  steps = walk_through()
  assert [c.split()[0] for c, _ in steps[:3]] == ['export', 'rm', '.venv/bin/python']
  exports = ''
  for command, shown in steps:
    if command.startswith('export '):
      exports += command + '\n'
      continue
    ran = subprocess.run(['bash', '-ec', exports + command], cwd=clone,
                         env={**USER_ENV, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    assert ran.returncode == 0, ran.stdout[-3000:]
    printed = [re.sub(r'^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ', r'\1 ...] ', line)
               for line in ran.stdout.splitlines()]
    assert matches(shown, printed), f'{command}\n' + '\n'.join(printed)
