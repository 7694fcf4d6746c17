"""Safetensors out and in: an Orbax checkpoint exported as transformers lays out a model, read back
by `safetensors`' own reader and by the job, on one process and on two; bad files refused in one
line with nothing written."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from etils import epath
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

import checkpoints
from jobs import REPO, launch, ok, outcome, run_job, write_config
from surgery_job import config as config_lib, output, paths
from surgery_job.errors import SurgeryError
from surgery_job.formats import safetensors as st_format, safetensors_file as sf
from test_bad_input import assert_bad_input
from test_safety import STREAMED, start_paused

EXPORT = {'transforms': [{'op': 'drop_optimizer'}], 'output': {'format': 'safetensors'}}
# Safetensors keep no sharding: the way back to Orbax lays leaves out as the source was saved.
IMPORT = {'mesh': {'shape': (2, 4), 'axes': ('data', 'model')},
          'partition_rules': [(suffix, tuple(spec)) for suffix, spec in checkpoints.SPECS.items()]}
SHARD_BYTES = 2000  # The layered params and step (4980 bytes) in 3 files.


def exported(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What an export of `flat` holds by tensor name: the params and the step, '/' written '.'."""
  return {k.replace('/', '.'): v for k, v in flat.items() if not k.startswith('opt_state/')}


def tensors(folder) -> dict[str, np.ndarray]:
  """Every tensor of every file in `folder`, read with `safetensors`' own reader; each file's
  metadata must be {"format": "pt"}."""
  found = {}
  for path in sorted(folder.glob('*.safetensors')):
    with safe_open(path, framework='np') as f:
      assert f.metadata() == {'format': 'pt'}
      found.update({name: f.get_tensor(name) for name in f.keys()})
  return found


def assert_bit_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
    assert actual[name].tobytes() == value.tobytes(), name


def run(tmp_path, name: str, config: dict, in_path, out, *overrides, processes: int = 1,
        env: dict | None = None):
  config_file = write_config(tmp_path, config, f'{name}.py')
  args = [f'--config.input.path={in_path}', f'--config.output.path={out}', *overrides]
  if processes == 1:
    return run_job(config_file, *args, env=env)
  return launch(processes, f'--config={config_file}', *args, log_dir=tmp_path / f'{name}_logs')


def test_sharded_export_and_back_to_orbax(layered, tmp_path):
  in_path, x = layered
  out, back = tmp_path / 'hf', tmp_path / 'back'
  (tmp_path / 'config.json').write_text('{"model_type": "layered"}')
  export = {**EXPORT, 'output': {**EXPORT['output'], 'extra_files': [str(tmp_path / 'config.json')]}}
  ok(run(tmp_path, 'export', export, in_path, out, f'--config.output.max_shard_size={SHARD_BYTES}'))
  step = out / '3'
  names = sf.file_names(3)
  assert sorted(p.name for p in step.iterdir()) == sorted(
      [*names, sf.INDEX, 'commit_success.txt', 'config.json', 'surgery_report.json'])
  assert (step / 'config.json').read_text() == '{"model_type": "layered"}'
  index = json.loads((step / sf.INDEX).read_text())
  expected = exported(x)
  assert index['metadata'] == {'total_size': sum(v.nbytes for v in expected.values()),
                               'total_parameters': sum(v.size for v in expected.values())}
  assert sorted(index['weight_map']) == sorted(expected)
  assert set(index['weight_map'].values()) == set(names)
  for name in names:
    entries, _ = sf.read_header(step / name)
    assert 0 < sum(e.nbytes for e in entries.values()) <= SHARD_BYTES
    assert {index['weight_map'][t] for t in entries} == {name}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(step / name).st_mode & 0o777 == 0o666 & ~umask
  assert_bit_equal(tensors(step), expected)

  ok(run(tmp_path, 'import', IMPORT, out, back))
  restored = checkpoints.flat_numpy(checkpoints.restore_plain(back / '3' / 'default'))
  assert_bit_equal(restored, {k: v for k, v in x.items() if not k.startswith('opt_state/')})
  assert checkpoints.saved_specs(back / '3' / 'default') == {
      k: checkpoints.normalized(checkpoints.saved_spec(k)) for k in restored}


def test_a_rerun_is_already_done_and_overwrite_replaces_the_export(layered, tmp_path):
  in_path, x = layered
  out, single = tmp_path / 'hf', tmp_path / 'single'
  config_file = write_config(tmp_path, EXPORT)
  args = [f'--config.input.path={in_path}', f'--config.output.path={out}']
  ok(run_job(config_file, *args))
  assert output.steps(out) == [3]  # An exported step, as max_to_keep and 'new' count them.
  again = run_job(config_file, *args)
  ok(again)
  assert 'Already done' in again.stderr
  ok(run_job(config_file, *args, '--config.output.max_shard_size=2000', '--config.output.overwrite=True'))
  assert sorted(p.name for p in (out / '3').glob('*.safetensors')) == sf.file_names(3)
  save_file(exported(x), tmp_path / 'model.safetensors')
  for _ in range(2):  # A single file's folder is a checkpoint too: the rerun is done.
    ok(run_job(config_file, f'--config.input.path={tmp_path / "model.safetensors"}',
               f'--config.output.path={single}'))


def test_a_changed_config_json_is_another_surgery(tmp_path):
  # The input folder's config.json goes to the output: a rerun after it changed is not done.
  folder, out = tmp_path / 'hf', tmp_path / 'out'
  folder.mkdir()
  save_file({'model.norm.weight': np.ones(4, np.float32)}, folder / 'model.safetensors')
  (folder / 'config.json').write_text('{"model_type": "first"}')
  config = {'output': {'format': 'safetensors'}}
  ok(run(tmp_path, 'export', config, folder, out))
  (folder / 'config.json').write_text('{"model_type": "second"}')
  again = run(tmp_path, 'export', config, folder, out)
  assert again.returncode == 2 and 'output.overwrite=True' in again.stderr.strip().splitlines()[-1]
  ok(run(tmp_path, 'export', config, folder, out, '--config.output.overwrite=True'))
  assert json.loads((out / 'config.json').read_text()) == {'model_type': 'second'}


def test_the_ready_export_config(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'hf'
  ok(run_job(REPO / 'configs' / 'export_safetensors.py', f'--config.input.path={in_path}',
             f'--config.output.path={out}'))
  assert_bit_equal(tensors(out / '3'), {k[len('params/'):].replace('/', '.'): v
                                        for k, v in x.items() if k.startswith('params/')})


def test_single_file_is_what_save_file_writes(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'hf'
  ok(run(tmp_path, 'export', EXPORT, in_path, out))
  assert sorted(p.name for p in (out / '3').iterdir()) == [
      'commit_success.txt', 'model.safetensors', 'surgery_report.json']
  save_file(exported(x), tmp_path / 'reference.safetensors', metadata={'format': 'pt'})
  assert (out / '3' / 'model.safetensors').read_bytes() == (
      tmp_path / 'reference.safetensors').read_bytes()


def test_a_stopped_export_resumes_from_the_groups_it_wrote(layered, tmp_path):
  in_path, x = layered
  out = tmp_path / 'hf'
  config = write_config(tmp_path, EXPORT)
  process = start_paused(config, in_path, out, 'group_written', tmp_path / 'paused', STREAMED)
  process.kill()
  process.wait(timeout=60)
  assert not (out / '3').exists()
  rerun = run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}', STREAMED)
  ok(rerun)
  assert 'groups were written by an earlier run (groups 0)' in rerun.stderr
  assert json.loads((out / '3' / 'surgery_report.json').read_text())['groups_reused'] == [0]
  save_file(exported(x), tmp_path / 'reference.safetensors', metadata={'format': 'pt'})
  assert (out / '3' / 'model.safetensors').read_bytes() == (
      tmp_path / 'reference.safetensors').read_bytes()


def test_validation_catches_a_flipped_byte(layered, tmp_path):
  in_path, _ = layered
  out = tmp_path / 'hf'
  result = run(tmp_path, 'export', EXPORT, in_path, out, env={'SURGERY_JOB_CORRUPT_OUTPUT': '1'})
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'validation failed: 1 leaves differ on disk' in result.stderr
  assert not (out / '3').exists()


def test_validation_checks_each_header_against_the_plan(layered, tmp_path):
  # The metadata {"format": "tf"} in place of "pt": a sound file holding the right bytes, which
  # only the check of its header against the plan refuses.
  in_path, _ = layered
  out = tmp_path / 'hf'
  process = start_paused(write_config(tmp_path, EXPORT), in_path, out, 'validate', tmp_path / 'paused')
  (written,) = out.rglob('model.safetensors')
  data = written.read_bytes()
  assert data.count(b'"format":"pt"') == 1
  written.write_bytes(data.replace(b'"format":"pt"', b'"format":"tf"'))
  with safe_open(written, framework='np') as f:
    assert f.metadata() == {'format': 'tf'}
  (tmp_path / 'paused').unlink()
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 1, stderr[-2000:]
  assert stderr.strip().splitlines()[-1].endswith(
      f'validation failed: cannot read the checkpoint in {written.parent}: {written}: its header is '
      'not the planned one'), stderr[-2000:]
  assert not (out / '3').exists()


def test_two_processes_each_write_their_shards(two_process_checkpoint, tmp_path):
  in_path, x = two_process_checkpoint
  out, back = tmp_path / 'hf', tmp_path / 'back'
  ok(run(tmp_path, 'export', EXPORT, in_path, out, f'--config.output.max_shard_size={SHARD_BYTES}',
         processes=2))
  expected = exported(x)
  wrote = [int(re.search(r'Process \d wrote (\d+) bytes', (tmp_path / 'export_logs' /
                                                          f'process_{i}.log').read_text()).group(1))
           for i in range(2)]
  # Each process wrote the shards it holds, every replicated byte by one process only.
  assert min(wrote) > 0 and sum(wrote) == sum(v.nbytes for v in expected.values())
  assert_bit_equal(tensors(out / '3'), expected)
  ok(run(tmp_path, 'import', IMPORT, out, back, processes=2))
  restored = checkpoints.flat_numpy(checkpoints.restore_plain(back / '3' / 'default'))
  assert_bit_equal(restored, {k: v for k, v in x.items() if not k.startswith('opt_state/')})


def test_single_file_input_and_its_key_separator(tmp_path):
  rng = np.random.default_rng(0)
  values = {'model.embed.weight': rng.normal(size=(6, 4)).astype(np.float32),
            'model.norm.weight': np.ones(4, np.float16), 'lm_head.weight': rng.integers(0, 9, (4, 6), dtype=np.int32)}
  save_file(values, tmp_path / 'model.safetensors')
  out = tmp_path / 'orbax'
  ok(run(tmp_path, 'import', {}, tmp_path / 'model.safetensors', out))
  restored = checkpoints.flat_numpy(checkpoints.restore_plain(out))
  assert_bit_equal(restored, {k.replace('.', '/'): v for k, v in values.items()})


def test_key_separators_write_and_split_tensor_names(layered, tmp_path):
  in_path, x = layered
  out, back = tmp_path / 'hf', tmp_path / 'back'
  ok(run(tmp_path, 'export', EXPORT, in_path, out, '--config.output.key_separator=::'))
  params = {k: v for k, v in x.items() if not k.startswith('opt_state/')}
  assert_bit_equal(tensors(out / '3'), {k.replace('/', '::'): v for k, v in params.items()})
  ok(run(tmp_path, 'import', IMPORT, out, back, '--config.input.key_separator=::'))
  assert_bit_equal(checkpoints.flat_numpy(checkpoints.restore_plain(back / '3' / 'default')), params)


def test_each_block_a_process_holds_is_read_once(tmp_path, monkeypatch):
  # 'w' is cut in 4 column blocks, each held by the 2 devices of a 'data' pair; 'b' by all 8.
  rng = np.random.default_rng(2)
  values = {'w': rng.normal(size=(4, 16)).astype(np.float32), 'b': np.arange(16, dtype=np.int32)}
  save_file(values, tmp_path / 'model.safetensors')
  reads = []
  read_block = sf.read_block

  def counting(source, entry, index=()):
    reads.append((entry.name, tuple(part.indices(size) for part, size in zip(index, entry.shape))))
    return read_block(source, entry, index)

  monkeypatch.setattr(sf, 'read_block', counting)
  out = tmp_path / 'orbax'
  assert outcome({'mesh': {'shape': (2, 4), 'axes': ('data', 'model')},
                  'partition_rules': [('w', (None, 'model'))],
                  'input': {'path': str(tmp_path / 'model.safetensors')},
                  'output': {'path': str(out)}}) == 'ok'
  assert sorted(reads) == sorted([('b', ((0, 16, 1),))] + [
      ('w', ((0, 4, 1), (4 * i, 4 * i + 4, 1))) for i in range(4)])
  assert_bit_equal(checkpoints.flat_numpy(checkpoints.restore_plain(out)), values)
  assert checkpoints.saved_specs(out)['w'] == P(None, 'model')


def test_inspect_and_diff_read_an_export(layered, tmp_path):
  in_path, _ = layered
  out = tmp_path / 'hf'
  config_file = write_config(tmp_path, EXPORT, 'export.py')
  ok(run_job(config_file, f'--config.input.path={in_path}', f'--config.output.path={out}'))
  shown = subprocess.run([sys.executable, '-m', 'surgery_job.inspect', str(out)], cwd=REPO,
                         capture_output=True, text=True, check=False)
  assert shown.returncode == 0, shown.stderr
  assert shown.stdout.splitlines()[0] == f'{out}: safetensors checkpoint, step 3'
  assert '    embedding   (16, 8) float32 P() 512 B' in shown.stdout
  diff = subprocess.run([sys.executable, '-m', 'surgery_job.diff', str(in_path), str(out), '--values',
                         '--map', str(config_file)], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert diff.returncode == 0, diff.stdout[-2000:] + diff.stderr[-2000:]
  assert diff.stdout.splitlines()[-1] == (
      'EQUAL: 0 only in A, 0 only in B, 0 changed; 13 of 13 leaves bit-equal')


@pytest.mark.parametrize('value, size', [(None, 5 * 10**9), ('5GB', 5 * 10**9), ('500MB', 5 * 10**8),
                                         ('2GiB', 2 * 2**30), (1000, 1000)])
def test_max_shard_size_as_transformers_reads_it(value, size):
  assert config_lib.shard_size(value) == size


@pytest.mark.parametrize('value', ['5 parsecs', 0, -1, True, 1.5])
def test_bad_max_shard_size(value):
  with pytest.raises(SurgeryError, match='output.max_shard_size'):
    config_lib.shard_size(value)


def test_leaves_without_a_safetensors_dtype_are_refused(layered, tmp_path):
  in_path, _ = layered
  out = tmp_path / 'hf'
  fields = {**EXPORT, 'transforms': [*EXPORT['transforms'],
                                     {'op': 'cast', 'pattern': 'head/bias', 'dtype': 'int4'}],
            'input': {'path': str(in_path)}, 'output': {'path': str(out), 'format': 'safetensors'}}
  assert outcome(fields) == (
      "error: output.format is safetensors but leaf 'params/head/bias': dtype int4 has no "
      'safetensors equivalent (safetensors stores ' + ', '.join(sf.DTYPES) + ') (drop it or cast '
      'it first)')
  assert not out.exists()


def test_custom_metadata_is_refused(layered, tmp_path):
  out = tmp_path / 'hf'
  assert outcome({**EXPORT, 'input': {'path': str(layered[0])}, 'output': {
      'path': str(out), 'format': 'safetensors', 'custom_metadata': {'scan_layers': True}}}) == (
          'error: output.custom_metadata is set but output.format safetensors has no step '
          'metadata to record it in')
  assert not out.exists()


def test_typed_prng_keys_are_refused(tmp_path):
  in_path, out = tmp_path / 'ckpt', tmp_path / 'hf'
  checkpoints.save_manager(in_path, {'params': {'w': np.ones(3, np.float32)},
                                     'rng': jax.random.key(0)}, step=1)
  error = outcome({'input': {'path': str(in_path)}, 'output': {'path': str(out), 'format': 'safetensors'}})
  assert error.startswith("error: output.format is safetensors but leaf 'rng': dtype key<fry> has "
                          'no safetensors equivalent'), error
  assert not out.exists()


def raw_file(path, header: dict, data: bytes) -> None:
  """A safetensors file from a header as given, right or wrong."""
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  path.write_bytes(len(text).to_bytes(8, 'little') + text + data)


F32_2 = {'dtype': 'F32', 'shape': [2]}


def _bad_inputs(folder) -> dict:
  """{case: (input path, expected text of the error line)}, each input written into `folder`."""
  cases = {}

  def case(name, header=None, data=b'\0' * 16, expected=''):
    path = folder / name / 'model.safetensors'
    path.parent.mkdir()
    if header is not None:
      raw_file(path, header, data)
    cases[name] = (path.parent, expected.format(file=path))
    return path

  length = case('header_length', {'a': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8,
                'safetensors file {file}: header length 1000000 runs past the end of the file')
  length.write_bytes((10**6).to_bytes(8, 'little') + length.read_bytes()[8:])
  broken = case('broken_json', {'a': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8,
                'safetensors file {file}: header is not valid JSON')
  broken.write_bytes(broken.read_bytes().replace(b'{"a"', b'["a"', 1))
  case('unknown_dtype', {'a': {'dtype': 'F31', 'shape': [2], 'data_offsets': [0, 8]}}, b'\0' * 8,
       "safetensors file {file}: tensor 'a': unknown dtype \"F31\" (known: " + ', '.join(sf.DTYPES) + ')')
  case('shape_size', {'a': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, b'\0' * 8,
       "safetensors file {file}: tensor 'a': shape [3] of F32 is 12 bytes but data_offsets [0, 8] hold 8")
  case('overlap', {'a': {**F32_2, 'data_offsets': [0, 8]}, 'b': {**F32_2, 'data_offsets': [4, 12]}},
       b'\0' * 12, "safetensors file {file}: tensor 'b': data_offsets [4, 12] overlap those of 'a'")
  case('gap', {'a': {**F32_2, 'data_offsets': [0, 8]}, 'b': {**F32_2, 'data_offsets': [12, 20]}},
       b'\0' * 20, "safetensors file {file}: tensor 'b': bytes 8 to 12 of the data")
  truncated = case('truncated', {'a': {**F32_2, 'data_offsets': [0, 8]},
                                 'b': {**F32_2, 'data_offsets': [8, 16]}}, b'\0' * 16,
                   "safetensors file {file}: tensor 'b': data_offsets [8, 16] run past the end")
  truncated.write_bytes(truncated.read_bytes()[:-3])
  case('keys_alike', {'a.b': {**F32_2, 'data_offsets': [0, 8]}, 'a/b': {**F32_2, 'data_offsets': [8, 16]}},
       expected="safetensors file {file}: tensor 'a/b' and tensor 'a.b' both make the key 'a/b'")
  case('leaf_and_subtree', {'a': {**F32_2, 'data_offsets': [0, 8]},
                            'a.b': {**F32_2, 'data_offsets': [8, 16]}},
       expected="safetensors file {file}: tensor 'a.b' lies under tensor 'a'; a tree holds a leaf or "
                'a subtree at one key, not both')
  missing = case('index_missing_file', expected="tensor 'b': its file model-00002-of-00002.safetensors "
                 'does not exist')
  raw_file(missing.parent / 'model-00001-of-00002.safetensors',
           {'a': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8)
  (missing.parent / sf.INDEX).write_text(json.dumps({'metadata': {}, 'weight_map': {
      'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}}))
  twice = case('index_tensor_twice', expected="tensor 'a' is in both model-00001-of-00002.safetensors "
               'and model-00002-of-00002.safetensors')
  first, second = sf.file_names(2)
  raw_file(twice.parent / first, {'a': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8)
  raw_file(twice.parent / second, {'a': {**F32_2, 'data_offsets': [0, 8]},
                                   'b': {**F32_2, 'data_offsets': [8, 16]}}, b'\0' * 16)
  (twice.parent / sf.INDEX).write_text(json.dumps({'metadata': {}, 'weight_map': {
      'a': first, 'b': second}}))
  named = case('index_names_a_tensor_twice').parent
  raw_file(named / first, {'a': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8)
  raw_file(named / second, {'b': {**F32_2, 'data_offsets': [0, 8]}}, b'\0' * 8)
  (named / sf.INDEX).write_text(
      f'{{"metadata": {{}}, "weight_map": {{"a": "{first}", "b": "{second}", "a": "{second}"}}}}')
  cases['index_names_a_tensor_twice'] = (named, f"safetensors index {named / sf.INDEX}: 'a' is "
                                                'listed twice')
  return cases


BAD_INPUTS = ('header_length', 'broken_json', 'unknown_dtype', 'shape_size', 'overlap', 'gap',
              'truncated', 'keys_alike', 'leaf_and_subtree', 'index_missing_file',
              'index_tensor_twice', 'index_names_a_tensor_twice')


@pytest.mark.parametrize('name', BAD_INPUTS)
def test_a_bad_input_is_refused_by_the_command_in_one_line(name, tmp_path):
  (tmp_path / 'in').mkdir()
  cases = _bad_inputs(tmp_path / 'in')
  assert sorted(cases) == sorted(BAD_INPUTS)
  in_path, expected = cases[name]
  out = tmp_path / 'out'
  result = run(tmp_path, 'import', {}, in_path, out)
  assert_bad_input(result, expected)
  assert not out.exists()


def test_transformers_loads_an_exported_llama(tmp_path):
  hf_config = transformers.LlamaConfig(
      vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  # A JAX run's checkpoint of the same weights: keys are the HF names under `params`, '.' as '/'.
  flat = {f'params/{name.replace(".", "/")}': value.detach().numpy()
          for name, value in model.state_dict().items()}
  in_path, out = tmp_path / 'ckpt', tmp_path / 'hf'
  checkpoints.save_manager(in_path, traverse_util.unflatten_dict(flat, sep='/'), step=1)
  hf_config.save_pretrained(tmp_path / 'config')
  config = tmp_path / 'export.py'
  config.write_text('from configs.export_safetensors import get_config as export\n\n\n'
                    'def get_config():\n  config = export()\n'
                    f'  config.output.extra_files = [{str(tmp_path / "config" / "config.json")!r}]\n'
                    '  return config\n')
  ok(run_job(config, f'--config.input.path={in_path}', f'--config.output.path={out}',
             '--config.output.max_shard_size=20000'))
  assert len(list((out / '1').glob('model-*.safetensors'))) > 1
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out / '1').eval()
  tokens = torch.arange(10).reshape(1, 10)
  with torch.no_grad():
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_a_sharded_folder_on_gs_is_read_in_ranges(gs_path, tmp_path, gcs):
  rng = np.random.default_rng(1)
  values = {'a.kernel': rng.normal(size=(8, 16)).astype(np.float32),
            'b.bias': rng.normal(size=(16,)).astype(ml_dtypes.bfloat16)}
  first, second = sf.file_names(2)
  save_file({'a.kernel': values['a.kernel']}, tmp_path / first)
  save_file({'b.bias': values['b.bias']}, tmp_path / second)
  for name in (first, second):
    (gs_path / 'hf' / name).write_bytes((tmp_path / name).read_bytes())
  (gs_path / 'hf' / sf.INDEX).write_text(sf.index_json({'a.kernel': first, 'b.bias': second}, 0))
  out = tmp_path / 'orbax'
  config = write_config(tmp_path, {'mesh': {'shape': (2, 4), 'axes': ('data', 'model')},
                                   'partition_rules': [('a/kernel', (None, 'model'))]})
  ok(run_job(config, f'--config.input.path={gs_path / "hf"}', f'--config.output.path={out}',
             env=gcs.env))
  assert_bit_equal(checkpoints.flat_numpy(checkpoints.restore_plain(out)),
                   {k.replace('.', '/'): v for k, v in values.items()})
  assert checkpoints.saved_specs(out)['a/kernel'] == P(None, 'model')


def test_shards_side_by_side_are_written_as_whole_rows():
  x = np.random.default_rng(4).normal(size=(6, 8)).astype(np.float32)
  # As P('data', 'model') on the 2x4 mesh cuts it, in any order; pieces of 2 rows of 32 bytes.
  shards = [(slice(r, r + 3), slice(c, c + 2)) for r in (3, 0) for c in (6, 2, 0, 4)]
  joined = list(st_format.joined_rows([(i, x[i]) for i in shards], x.shape, piece=2 * 32))
  assert [index for index, _ in joined] == [(slice(r0, r1), slice(0, 8))
                                            for r0, r1 in ((0, 2), (2, 3), (3, 5), (5, 6))]
  for index, block in joined:
    assert block.tobytes() == x[index].tobytes()
  # Not side by side (a gap, or other rows): written as they are.
  apart = [(slice(0, 3), slice(0, 2)), (slice(0, 3), slice(4, 6)), (slice(3, 6), slice(2, 4))]
  assert [(i, b.tobytes()) for i, b in st_format.joined_rows([(i, x[i]) for i in apart], x.shape)] == [
      (i, x[i].tobytes()) for i in apart]


def test_a_file_on_gs_is_assembled_a_few_rows_at_a_time(gs_path, monkeypatch):
  # Shards cut across both axes; pieces of 3 rows of 40 bytes: no read, and no write into the
  # upload buffer, holds more than a piece.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(12, 10)).astype(np.float32)
  blocks = [(slice(r0, r1), slice(c0, c1)) for r0, r1 in ((0, 5), (5, 12)) for c0, c1 in ((0, 4), (4, 10))]
  for index in blocks:
    (gs_path / 'x' / st_format._block_name(index, x.shape)).write_bytes(x[index].tobytes())
  (gs_path / 'y' / 'scalar').write_bytes(np.asarray(7, np.int64).tobytes())
  _, entries = sf.encode([('x', x.dtype, x.shape), ('y', np.int64, ())])
  fs = epath.backend.fsspec_backend.fs(str(gs_path))
  reads = []
  cat_file = fs.cat_file

  def counting(path, start=None, end=None, **kwargs):
    reads.append(end - start)
    return cat_file(path, start=start, end=end, **kwargs)

  monkeypatch.setattr(fs, 'cat_file', counting)
  writes = []

  class Upload(io.BytesIO):
    def write(self, data):
      writes.append(memoryview(data).nbytes)
      return super().write(data)

  out = Upload()
  st_format.stream_tensor(out, entries['x'], gs_path / 'x', piece=3 * 40)
  st_format.stream_tensor(out, entries['y'], gs_path / 'y', piece=3 * 40)
  assert out.getvalue() == x.tobytes() + np.asarray(7, np.int64).tobytes()
  assert writes == [120] * 4 + [8] and max(reads) <= 120 and sum(reads) == x.nbytes + 8


@pytest.mark.parametrize('processes', [1, 2])
def test_export_to_gs(processes, layered, gs_path, tmp_path, gcs):
  in_path, x = layered
  out = gs_path / 'hf'
  config_file = write_config(tmp_path, EXPORT)
  args = [f'--config.input.path={in_path}', f'--config.output.path={out}',
          f'--config.output.max_shard_size={SHARD_BYTES}']
  ok(run_job(config_file, *args, env=gcs.env) if processes == 1 else
     launch(2, f'--config={config_file}', *args, log_dir=tmp_path / 'logs', env=gcs.env))
  local = tmp_path / 'hf'
  local.mkdir()
  for file in (out / '3').iterdir():
    (local / file.name).write_bytes(file.read_bytes())
  assert sorted(p.name for p in local.iterdir()) == sorted(
      [*sf.file_names(3), sf.INDEX, 'commit_success.txt', 'surgery_report.json'])
  assert_bit_equal(tensors(local), exported(x))
  assert not [p for p in paths.files(gs_path) if 'partial_save' in str(p) or '-surgery' in str(p)]
