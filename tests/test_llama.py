"""The Llama family between MaxText and Hugging Face, in process: the reference forward of the
MaxText layout against transformers' logits, the family's transforms against HF.md's formulas bit
for bit, their result loaded into transformers, and every bad input the issue lists."""

import numpy as np
import pytest

import llama_reference as ref

TOLERANCE = 1e-4


@pytest.fixture(scope='session')
def hf():
  """The tiny model, its tensors under the job's keys, and its logits on ref.TOKENS."""
  model = ref.hf_model()
  return model, ref.hf_tensors(model), ref.hf_logits(model)


@pytest.mark.parametrize('scanned', [True, False], ids=['scanned', 'unscanned'])
@pytest.mark.parametrize('rotary', ['interleaved', 'halves'])
def test_reference_forward_of_the_imported_tensors_equals_transformers(hf, rotary, scanned):
  _, tensors, logits = hf
  params = ref.hf_to_maxtext(tensors, rotary, scanned)
  np.testing.assert_allclose(ref.maxtext_logits(params, rotary), logits, rtol=0, atol=TOLERANCE)
  back = ref.maxtext_to_hf(params, rotary)
  assert back.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def _query_unscaled(params):
  q = params['decoder/layers/self_attention/query/kernel']
  return {**params, 'decoder/layers/self_attention/query/kernel': q * np.float32(np.sqrt(ref.HEAD_DIM))}


def _o_proj_transposed_wrongly(hf_tensors):
  # (E, Nq*D) is square here, so reading it untransposed fits every shape.
  return {k: v.T if k.endswith('o_proj/weight') else v for k, v in hf_tensors.items()}


@pytest.mark.parametrize('mistake', ['rotary not converted', 'query not scaled', 'o_proj transposed wrongly'])
def test_a_wrong_mapping_moves_the_logits_far_beyond_the_tolerance(hf, mistake):
  _, tensors, logits = hf
  if mistake == 'rotary not converted':
    params, rotary = ref.hf_to_maxtext(tensors, 'halves', True), 'interleaved'
  elif mistake == 'query not scaled':
    params, rotary = _query_unscaled(ref.hf_to_maxtext(tensors, 'halves', True)), 'halves'
  else:
    params, rotary = ref.hf_to_maxtext(_o_proj_transposed_wrongly(tensors), 'halves', True), 'halves'
  assert np.abs(ref.maxtext_logits(params, rotary) - logits).max() > 100 * TOLERANCE


# --- The family's transforms, run as the job runs them (plan.run_ops on the checkpoint's layout).

import json  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import safetensors  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

from surgery_job import plan, transforms, tree  # pylint: disable=wrong-import-position
from surgery_job.errors import SurgeryError  # pylint: disable=wrong-import-position
from surgery_job.families import llama  # pylint: disable=wrong-import-position
from surgery_job.transforms import Leaf  # pylint: disable=wrong-import-position

KINDS = ['linen scanned', 'linen unscanned', 'nnx scanned', 'nnx unscanned', 'training step']
ROTARIES = ['interleaved', 'halves']


def run(ops: list[dict], flat: dict) -> dict[str, np.ndarray]:
  """The flat checkpoint after `ops`, split into params, mirrors and others as the job does."""
  layout = tree.find_layout(list(flat), None)
  leaves = {k: Leaf(v if isinstance(v, jax.Array) else jnp.asarray(v), None) for k, v in flat.items()}
  return {k: np.asarray(leaf.value) for k, leaf in
          plan.run_ops(transforms.build(ops), layout, leaves).items()}


def checkpoint(params: dict, kind: str) -> dict:
  """MaxText's params (bare paths) as a checkpoint of `kind`: Linen `params/params/<path>`, NNX
  `<path>/value`, or a Linen training step with Adam's mu and nu, a step and an rng key."""
  if kind.startswith('nnx'):
    return {f'{k}/value': v for k, v in params.items()}
  flat = {f'params/params/{k}': v for k, v in params.items()}
  if kind == 'training step':
    rng = np.random.default_rng(3)
    for moment in ('mu', 'nu'):
      flat.update({f'opt_state/0/{moment}/params/{k}': rng.normal(size=v.shape).astype(v.dtype)
                   for k, v in params.items()})
    flat.update({'opt_state/0/count': np.asarray(5, np.int32), 'step': np.asarray(5, np.int32),
                 'nnx_aux/rngs/dropout/key': jax.random.key(0),
                 'nnx_aux/rngs/dropout/count': np.asarray(7, np.uint32)})
  return flat


def shapes(flat: dict) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in flat.items()}


def bare(flat: dict) -> dict:
  """The MaxText paths of a Linen params tree."""
  return {k.removeprefix('params/params/'): v for k, v in flat.items() if k.startswith('params/params/')}


def assert_same_tensors(found: dict, expected: dict):
  assert sorted(found) == sorted(expected)
  for key, value in expected.items():
    assert found[key].dtype == value.dtype, key
    np.testing.assert_array_equal(found[key], value, err_msg=key)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('rotary', ROTARIES)
def test_to_hf_equals_hf_md_formulas_bit_for_bit(hf, rotary, kind):
  _, tensors, _ = hf
  params = ref.hf_to_maxtext(tensors, rotary, scanned='unscanned' not in kind)
  flat = checkpoint(params, kind)
  sizes = llama.maxtext_sizes(shapes(flat))
  assert (sizes.embed, sizes.layers, sizes.q_heads, sizes.kv_heads, sizes.head_dim, sizes.mlp,
          sizes.vocab) == (ref.EMBED, ref.LAYERS, ref.Q_HEADS, ref.KV_HEADS, ref.HEAD_DIM, ref.MLP, ref.VOCAB)
  out = run(llama.to_hf_transforms(sizes, rotary), flat)
  # No optimizer state, step or rng key: HF's tensors only, as HF.md's formulas give them and, with
  # sqrt(16) a power of two, as transformers saved them.
  assert_same_tensors(out, ref.maxtext_to_hf(params, rotary))
  assert_same_tensors(out, tensors)


@pytest.mark.parametrize('scanned', [True, False], ids=['scanned', 'unscanned'])
@pytest.mark.parametrize('rotary', ROTARIES)
def test_from_hf_gives_maxtext_params_transformers_logits_and_back(hf, tmp_path, rotary, scanned):
  model, tensors, logits = hf
  ref.save_hf(model, tmp_path)
  sizes = llama.hf_sizes(json.loads((tmp_path / 'config.json').read_text()), shapes(tensors))
  imported = run(llama.from_hf_transforms(sizes, rotary, scanned, 'float32'), tensors)
  assert imported.pop('step') == 0
  assert_same_tensors(bare(imported), ref.hf_to_maxtext(tensors, rotary, scanned))
  assert sorted(imported) == sorted(f'params/params/{k}' for k in bare(imported))
  np.testing.assert_allclose(ref.maxtext_logits(bare(imported), rotary), logits, rtol=0, atol=TOLERANCE)
  back = run(llama.to_hf_transforms(llama.maxtext_sizes(shapes(imported)), rotary), imported)
  assert_same_tensors(back, tensors)


def random_maxtext(scanned: bool, seed: int = 5) -> dict[str, np.ndarray]:
  """A MaxText-layout Llama of random weights, not made from any HF model."""
  rng = np.random.default_rng(seed)
  e, nq, nkv, d, f, v = ref.EMBED, ref.Q_HEADS, ref.KV_HEADS, ref.HEAD_DIM, ref.MLP, ref.VOCAB
  layer = {'pre_self_attention_layer_norm/scale': (e,), 'post_self_attention_layer_norm/scale': (e,),
           'self_attention/query/kernel': (e, nq, d), 'self_attention/key/kernel': (e, nkv, d),
           'self_attention/value/kernel': (e, nkv, d), 'self_attention/out/kernel': (nq, d, e),
           'mlp/wi_0/kernel': (e, f), 'mlp/wi_1/kernel': (e, f), 'mlp/wo/kernel': (f, e)}

  def draw(shape, fan_in):
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

  def norm(shape):
    return (1 + 0.2 * rng.normal(size=shape)).astype(np.float32)
  params = {'token_embedder/embedding': draw((v, e), 1), 'decoder/decoder_norm/scale': norm((e,)),
            'decoder/logits_dense/kernel': draw((e, v), e)}
  for path, shape in layer.items():
    fan_in = e if path.startswith(('self_attention/q', 'self_attention/k', 'self_attention/v', 'mlp/wi')) else (
        nq * d if 'out' in path else f)
    make = (lambda s: norm(s)) if path.endswith('scale') else (lambda s: draw(s, fan_in))  # pylint: disable=cell-var-from-loop
    if scanned:
      params[f'decoder/layers/{path}'] = make((shape[0], ref.LAYERS, *shape[1:]))
    else:
      params.update({f'decoder/layers_{i}/{path}': make(shape) for i in range(ref.LAYERS)})
  return params


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('rotary', ROTARIES)
def test_to_hf_loads_in_transformers_with_the_reference_logits(rotary, kind):
  params = random_maxtext(scanned='unscanned' not in kind)
  flat = checkpoint(params, kind)
  sizes = llama.maxtext_sizes(shapes(flat))
  out = run(llama.to_hf_transforms(sizes, rotary), flat)
  # The reference rotates without llama3.1's frequency scaling, at theta 10000.
  config = llama.hf_config_json(sizes, rotary, {'rope_parameters': {'rope_type': 'default',
                                                                    'rope_theta': ref.ROPE_THETA}})
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  result = model.load_state_dict({k.replace('/', '.'): torch.from_numpy(v.copy()) for k, v in out.items()},
                                 strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  np.testing.assert_allclose(ref.hf_logits(model), ref.maxtext_logits(params, rotary), rtol=0,
                             atol=TOLERANCE)
