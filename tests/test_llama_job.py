"""The two Llama configs through the job: a Hugging Face folder saved by `save_pretrained` (sharded)
into MaxText's Orbax layout and back bit for bit, a MaxText training step exported to what
transformers loads and runs with the reference forward's logits, on one process and on two; the
refusals in one line with nothing written. Real commands where the route is the user's, the rest
in process through `job.run`."""

import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import transformers
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
import llama_reference as ref
from jobs import REPO, launch, ok, outcome, run_job
from surgery_job import plan, transforms, tree
from surgery_job.families import llama
from surgery_job.transforms import Leaf
from test_llama import checkpoint as maxtext_checkpoint, random_maxtext

TOLERANCE = 1e-4
CONFIGS = REPO / 'configs'


def ready(name: str, arg: str | None = None, **fields) -> ml_collections.ConfigDict:
  """A ready config as the command loads it (`configs/NAME.py:ARG`), with `fields` set."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for group, values in fields.items():
    for field, value in values.items():
      config[group][field] = value
  return config


def hf_files(folder) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face folder, read with `safetensors.numpy`, under the job's keys."""
  found = {}
  for path in sorted(folder.glob('*.safetensors')):
    found.update({k.replace('.', '/'): v for k, v in safetensors.numpy.load_file(path).items()})
  return found


def assert_bit_equal(found: dict, expected: dict):
  assert sorted(found) == sorted(expected)
  for key, value in expected.items():
    assert found[key].dtype == value.dtype and found[key].shape == value.shape, key
    assert found[key].tobytes() == value.tobytes(), key


def maxtext_params(item_dir) -> dict[str, np.ndarray]:
  """A MaxText Linen checkpoint restored with plain Orbax: its params by bare path, and the rest."""
  flat = checkpoints.flat_numpy(checkpoints.restore_plain(item_dir))
  return {k.removeprefix('params/params/'): v for k, v in flat.items()}


def custom_metadata(step_dir) -> dict:
  return json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())['custom_metadata']


def loaded(folder) -> transformers.LlamaForCausalLM:
  """`from_pretrained` on an export, which must load every weight: none missing, unexpected or
  mismatched."""
  model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  return model.eval()


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """The tiny GQA Llama saved by save_pretrained in several files; its tensors and logits."""
  model = ref.hf_model()
  folder = tmp_path_factory.mktemp('hf') / 'llama'
  ref.save_hf(model, folder, max_shard_size='100KB')
  assert len(list(folder.glob('model-*.safetensors'))) > 2
  return folder, ref.hf_tensors(model), ref.hf_logits(model)


def save_maxtext(path, flat: dict, step: int, scanned: bool) -> None:
  """A MaxText step as its trainer saves it: `<step>/items`, `scan_layers` in the step's metadata;
  the embedding and the scanned query kernel sharded over a 2x4 mesh."""
  mesh = checkpoints.mesh_2x4()
  specs = {'params/params/token_embedder/embedding': P('model', None),
           'params/params/decoder/layers/self_attention/query/kernel': P(None, None, 'model')}
  placed = {k: v if checkpoints.is_key(v) else jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
            for k, v in flat.items()}
  state = traverse_util.unflatten_dict(placed, sep='/')
  with ocp.CheckpointManager(path) as manager:
    manager.save(step, args=ocp.args.Composite(items=ocp.args.StandardSave(state)),
                 custom_metadata={'scan_layers': scanned})
    manager.wait_until_finished()


@pytest.fixture(scope='module')
def training_step(tmp_path_factory):
  """A MaxText Linen training step (scanned; Adam's mu and nu, a step and an rng key) of random
  weights; its params by bare path."""
  params = random_maxtext(scanned=True)
  path = tmp_path_factory.mktemp('maxtext') / 'checkpoints'
  save_maxtext(path, maxtext_checkpoint(params, 'training step'), step=5, scanned=True)
  return path, params


def test_hf_to_maxtext_and_back_gives_the_same_tensors_bit_for_bit(hf_folder, tmp_path):
  folder, tensors, logits = hf_folder
  maxtext, back = tmp_path / 'maxtext', tmp_path / 'hf'
  ok(run_job(f'{CONFIGS / "hf_llama_to_maxtext.py"}:scanned,float32', f'--config.input.path={folder}',
             f'--config.output.path={maxtext}'))
  # What MaxText's load_parameters_path=OUT/0/items reads, scan_layers where its loader looks.
  assert custom_metadata(maxtext / '0') == {'scan_layers': True}
  imported = maxtext_params(maxtext / '0' / 'items')
  assert imported.pop('step') == 0
  assert_bit_equal(imported, ref.hf_to_maxtext(tensors, 'interleaved', scanned=True))
  np.testing.assert_allclose(ref.maxtext_logits(imported, 'interleaved'), logits, rtol=0, atol=TOLERANCE)
  report = json.loads((maxtext / '0' / 'surgery_report.json').read_text())
  assert report['model']['notes'] == [
      'llama_from_hf: Hugging Face Llama, config.json agrees with the tensors: vocab 256, hidden 64, '
      '2 layers, 4 query heads, 2 kv heads, head_dim 16, mlp 128; rotary halves -> interleaved; '
      'query x 1/sqrt(16), exact in binary; scanned Linen layout, float32']

  ok(run_job(CONFIGS / 'maxtext_llama_to_hf.py', f'--config.input.path={maxtext}',
             f'--config.output.path={back}'))
  assert_bit_equal(hf_files(back / '0'), tensors)
  written = json.loads((back / '0' / 'config.json').read_text())
  assert {k: written[k] for k in ('num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps')} == {
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16, 'rms_norm_eps': 1e-5}
  loaded(back / '0')


@pytest.fixture(scope='module')
def exported(training_step, tmp_path_factory):
  """The training step exported by `maxtext_llama_to_hf.py:halves` on one process."""
  in_path, _ = training_step
  out = tmp_path_factory.mktemp('export') / 'hf'
  ok(run_job(f'{CONFIGS / "maxtext_llama_to_hf.py"}:halves', *export_args(in_path, out)))
  return out


def export_args(in_path, out) -> list[str]:
  return [f'--config.input.path={in_path}', f'--config.output.path={out}',
          '--config.output.hf_config.max_position_embeddings=64', '--config.output.hf_config.bos_token_id=0',
          '--config.output.max_shard_size=100KB']


def test_a_training_step_exports_to_what_transformers_runs(training_step, exported):
  _, params = training_step
  # Only HF's tensors: Adam's moments, the step and the rng key stay behind.
  assert_bit_equal(hf_files(exported / '5'), ref.maxtext_to_hf(params, 'halves'))
  written = json.loads((exported / '5' / 'config.json').read_text())
  assert (written['max_position_embeddings'], written['bos_token_id'], written['rope_parameters']) == (
      64, 0, {'rope_type': 'default', 'rope_theta': 10000.0})
  model = loaded(exported / '5')
  np.testing.assert_allclose(ref.hf_logits(model), ref.maxtext_logits(params, 'halves'), rtol=0,
                             atol=TOLERANCE)


def test_the_export_on_two_processes_equals_the_one_on_one(training_step, exported, tmp_path):
  in_path, _ = training_step
  out = tmp_path / 'hf'
  ok(launch(2, f'--config={CONFIGS / "maxtext_llama_to_hf.py"}:halves', *export_args(in_path, out),
            log_dir=tmp_path / 'logs'))
  files = sorted(p.name for p in (exported / '5').iterdir() if p.name != 'surgery_report.json')
  assert sorted(p.name for p in (out / '5').iterdir() if p.name != 'surgery_report.json') == files
  assert len([f for f in files if f.endswith('.safetensors')]) > 2
  for name in files:
    assert (out / '5' / name).read_bytes() == (exported / '5' / name).read_bytes(), name
  assert all('Process %d wrote' % i in (tmp_path / 'logs' / f'process_{i}.log').read_text()
             for i in range(2))


def test_an_nnx_params_tree_plans_and_exports_in_process(tmp_path, capsys):
  params = random_maxtext(scanned=False, seed=6)
  in_path, out = tmp_path / 'nnx', tmp_path / 'hf'
  save_maxtext(in_path, maxtext_checkpoint(params, 'nnx unscanned'), step=2, scanned=False)
  config = ready('maxtext_llama_to_hf', input={'path': str(in_path)}, output={'path': str(out)})
  config.dry_run = True
  assert outcome(config) == 'ok'
  plan = capsys.readouterr().out
  assert ('Model: llama_to_hf: MaxText Llama (NNX, unscanned): vocab 256, hidden 64, 2 layers, 4 query '
          'heads, 2 kv heads, head_dim 16, mlp 128; rotary interleaved -> halves; query x sqrt(16), '
          'exact in binary; writes config.json') in plan.splitlines()
  assert not out.exists()
  config.dry_run = False
  assert outcome(config) == 'ok'
  assert_bit_equal(hf_files(out / '2'), ref.maxtext_to_hf(params, 'interleaved'))
  written = json.loads((out / '2' / 'config.json').read_text())
  assert written['rope_parameters']['rope_type'] == 'llama3' and written['architectures'] == ['LlamaForCausalLM']


def test_import_unscanned_in_bfloat16_by_default(hf_folder, tmp_path):
  folder, tensors, _ = hf_folder
  out = tmp_path / 'maxtext'
  assert outcome(ready('hf_llama_to_maxtext', 'unscanned', input={'path': str(folder)},
                       output={'path': str(out)})) == 'ok'
  assert custom_metadata(out / '0') == {'scan_layers': False}
  imported = maxtext_params(out / '0' / 'items')
  assert imported.pop('step') == 0
  expected = ref.hf_to_maxtext(tensors, 'interleaved', scanned=False)
  assert_bit_equal(imported, {k: v.astype(jnp.bfloat16) for k, v in expected.items()})


@pytest.mark.parametrize('case', ['config.json disagrees', 'tied embedding', 'no config.json',
                                  'hf_config of a shape', 'hf_config without config.json'])
def test_refusals_in_one_line_with_nothing_written(hf_folder, tmp_path, case):
  """Each is the command's exit 2 with this line (`jobs.outcome`)."""
  folder, _, _ = hf_folder
  out = tmp_path / 'out'
  params = random_maxtext(scanned=True)
  if case == 'config.json disagrees':
    config, expected = ready('hf_llama_to_maxtext'), (
        'op 0 (llama_from_hf): config.json (num_key_value_heads=4, head_dim=16) disagrees with '
        'model/layers/0/self_attn/k_proj/weight: shape (32, 64), expected (64, 64)')
  elif case == 'tied embedding':
    del params['decoder/logits_dense/kernel']
    config, expected = ready('maxtext_llama_to_hf'), (
        'op 0 (llama_to_hf): params/params/decoder/logits_dense/kernel is missing: the embedding is '
        'tied (logits_via_embedding), and MaxText then divides the logits by sqrt(emb_dim), which a '
        'tied Hugging Face lm_head cannot express; untie it first')
  elif case == 'no config.json':
    config, expected = ready('hf_llama_to_maxtext'), (
        'op 0 (llama_from_hf): the input has no config.json, which holds the head counts: '
        'llama_from_hf reads a Hugging Face folder (config.json beside the safetensors)')
  elif case == 'hf_config of a shape':
    config = ready('maxtext_llama_to_hf')
    config.output.hf_config.head_dim = 8
    expected = 'config: output.hf_config.head_dim: the tensors decide it, not the config'
  else:
    config = ready('maxtext_llama_to_hf')
    config.transforms = [dict(op='keep', pattern='/params/.*')]
    expected = ('config: output.hf_config is set but there is no config.json to set it in: no op '
                'makes one (llama_to_hf) and the input has none')
  if case == 'no config.json':
    shutil.copytree(folder, tmp_path / 'in', ignore=shutil.ignore_patterns('config.json'))
  elif case == 'config.json disagrees':
    shutil.copytree(folder, tmp_path / 'in')
    config_json = json.loads((tmp_path / 'in' / 'config.json').read_text())
    (tmp_path / 'in' / 'config.json').write_text(json.dumps({**config_json, 'num_key_value_heads': 4}))
  else:
    save_maxtext(tmp_path / 'in', maxtext_checkpoint(params, 'linen'), step=1, scanned=True)
  config.input.path, config.output.path = str(tmp_path / 'in'), str(out)
  assert outcome(config) == f'error: {expected}'
  assert not out.exists()


@pytest.mark.parametrize('extra', [False, True], ids=['input config.json', 'extra_files wins'])
def test_a_safetensors_input_keeps_its_config_json(hf_folder, tmp_path, extra):
  folder, tensors, _ = hf_folder
  out = tmp_path / 'out'
  (tmp_path / 'config.json').write_text('{"model_type": "llama", "given": true}')
  config = ready('export_safetensors')
  config.transforms = [dict(op='cast', pattern='.*', dtype='bfloat16')]
  config.input.path, config.output.path = str(folder), str(out)
  config.output.hf_config = {'dtype': 'bfloat16'}
  config.output.extra_files = [str(tmp_path / 'config.json')] if extra else []
  assert outcome(config) == 'ok'
  written = json.loads((out / 'config.json').read_text())
  original = json.loads((folder / 'config.json').read_text())
  assert written == ({'model_type': 'llama', 'given': True} if extra else {**original, 'dtype': 'bfloat16'})
  assert_bit_equal(hf_files(out), {k: v.astype(jnp.bfloat16) for k, v in tensors.items()})


def test_the_notes_say_when_the_query_scale_is_not_exact_in_binary():
  sizes = llama.Sizes(embed=16, layers=1, q_heads=2, kv_heads=1, head_dim=8, mlp=32, vocab=16)
  letters = sizes.letters()
  leaves = {key: Leaf(jnp.ones([letters[letter] for letter in template.split()], jnp.float32), None)
            for key, template in llama.hf_shapes(sizes).items()}
  config_json = llama.hf_config_json(sizes, 'halves')
  state = plan.run_state(transforms.build([dict(op='llama_from_hf', dtype='float32')]),
                         tree.find_layout(list(leaves), None), leaves, model_config=config_json)
  assert state.model_config is None
  assert state.notes == (
      'llama_from_hf: Hugging Face Llama, config.json agrees with the tensors: vocab 16, hidden 16, 1 '
      'layers, 2 query heads, 1 kv heads, head_dim 8, mlp 32; rotary halves -> interleaved; query x '
      '1/sqrt(8), not exact in binary: sqrt(8) is not a power of two, so a round trip changes low '
      'bits; scanned Linen layout, float32',)
