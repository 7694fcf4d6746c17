"""The Llama family between MaxText and Hugging Face, in process: the reference forward of the
MaxText layout against transformers' logits, the family's transforms against HF.md's formulas bit
for bit, their result loaded into transformers, and every bad input the issue lists."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

import llama_reference as ref
from surgery_job import plan, transforms, tree
from surgery_job.errors import SurgeryError
from surgery_job.families import llama
from surgery_job.transforms import Leaf

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


KINDS = ['linen scanned', 'linen unscanned', 'nnx scanned', 'nnx unscanned', 'nnx under base',
         'training step']
ROTARIES = ['interleaved', 'halves']


def run(ops: list[dict], flat: dict) -> dict[str, np.ndarray]:
  """The flat checkpoint after `ops`, split into params, mirrors and others as the job does."""
  layout = tree.find_layout(list(flat), None)
  leaves = {k: Leaf(v if isinstance(v, jax.Array) else jnp.asarray(v), None) for k, v in flat.items()}
  return {k: np.asarray(leaf.value) for k, leaf in
          plan.run_ops(transforms.build(ops), layout, leaves).items()}


def checkpoint(params: dict, kind: str) -> dict:
  """MaxText's params (bare paths) as a checkpoint of `kind`: Linen `params/params/<path>`, NNX
  `<path>/value` (under `base/`, as MaxText's loader also reads it), or a Linen training step with
  Adam's mu and nu, a step and an rng key."""
  if kind.startswith('nnx'):
    return {f'{prefix(kind)}{k}/value': v for k, v in params.items()}
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


def prefix(kind: str) -> str:
  return 'base/' if kind == 'nnx under base' else ''


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
  sizes = llama.maxtext_sizes(shapes(flat), prefix(kind))
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


def test_to_hf_computes_in_float32_from_bfloat16_params(hf):
  # MaxText's exporter restores weight_dtype float32: the query is scaled after the cast.
  params = {k: v.astype(jnp.bfloat16) for k, v in ref.hf_to_maxtext(hf[1], 'interleaved', True).items()}
  flat = checkpoint(params, 'training step')
  out = run(llama.to_hf_transforms(llama.maxtext_sizes(shapes(flat)), 'interleaved'), flat)
  assert_same_tensors(out, ref.maxtext_to_hf({k: v.astype(np.float32) for k, v in params.items()},
                                             'interleaved'))
  as_bf16 = run(llama.to_hf_transforms(llama.maxtext_sizes(shapes(flat)), 'interleaved', 'bfloat16'), flat)
  assert_same_tensors(as_bf16, {k: v.astype(jnp.bfloat16) for k, v in out.items()})


def test_a_tied_hf_llama_imports_with_its_embedding_as_the_logits_kernel(tmp_path):
  model = ref.hf_model(seed=1, tied=True)
  ref.save_hf(model, tmp_path)
  with safetensors.safe_open(tmp_path / 'model.safetensors', framework='numpy') as f:
    tensors = {key.replace('.', '/'): f.get_tensor(key) for key in f.keys()}
  assert 'lm_head/weight' not in tensors
  sizes = llama.hf_sizes(json.loads((tmp_path / 'config.json').read_text()), shapes(tensors))
  imported = bare(run(llama.from_hf_transforms(sizes, 'halves', dtype='float32'), tensors))
  np.testing.assert_array_equal(imported['decoder/logits_dense/kernel'], tensors['model/embed_tokens/weight'].T)
  np.testing.assert_allclose(ref.maxtext_logits(imported, 'halves'), ref.hf_logits(model), rtol=0,
                             atol=TOLERANCE)


def random_maxtext(scanned: bool, seed: int = 5) -> dict[str, np.ndarray]:
  """A MaxText-layout Llama of random weights, not made from any HF model: kernels scaled by their
  fan-in, norms around 1."""
  rng = np.random.default_rng(seed)
  e, nq, nkv, d, f, v = ref.EMBED, ref.Q_HEADS, ref.KV_HEADS, ref.HEAD_DIM, ref.MLP, ref.VOCAB
  # path -> (shape of one layer, fan-in; 0 for a norm scale).
  layer = {'pre_self_attention_layer_norm/scale': ((e,), 0),
           'post_self_attention_layer_norm/scale': ((e,), 0),
           'self_attention/query/kernel': ((e, nq, d), e), 'self_attention/key/kernel': ((e, nkv, d), e),
           'self_attention/value/kernel': ((e, nkv, d), e), 'self_attention/out/kernel': ((nq, d, e), nq * d),
           'mlp/wi_0/kernel': ((e, f), e), 'mlp/wi_1/kernel': ((e, f), e), 'mlp/wo/kernel': ((f, e), f)}

  def draw(shape, fan_in):
    x = 1 + 0.2 * rng.normal(size=shape) if fan_in == 0 else rng.normal(size=shape) / np.sqrt(fan_in)
    return x.astype(np.float32)
  params = {'token_embedder/embedding': draw((v, e), 1), 'decoder/decoder_norm/scale': draw((e,), 0),
            'decoder/logits_dense/kernel': draw((e, v), e)}
  for path, (shape, fan_in) in layer.items():
    if scanned:
      params[f'decoder/layers/{path}'] = draw((shape[0], ref.LAYERS, *shape[1:]), fan_in)
    else:
      params.update({f'decoder/layers_{i}/{path}': draw(shape, fan_in) for i in range(ref.LAYERS)})
  return params


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('rotary', ROTARIES)
def test_to_hf_loads_in_transformers_with_the_reference_logits(rotary, kind):
  params = random_maxtext(scanned='unscanned' not in kind)
  flat = checkpoint(params, kind)
  sizes = llama.maxtext_sizes(shapes(flat), prefix(kind))
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


def test_from_hf_writes_bfloat16_by_default_and_a_step(hf):
  _, tensors, _ = hf
  sizes = llama.hf_sizes(ref.hf_config().to_dict(), shapes(tensors))
  imported = run(llama.from_hf_transforms(sizes, 'interleaved'), tensors)
  step = imported.pop('step')
  assert step.dtype == np.int32 and step == 0
  expected = ref.hf_to_maxtext(tensors, 'interleaved', scanned=True)
  assert_same_tensors(bare(imported), {k: v.astype(jnp.bfloat16) for k, v in expected.items()})


def test_hf_sizes_of_a_sharded_save_pretrained_folder(hf, tmp_path):
  model, tensors, _ = hf
  ref.save_hf(model, tmp_path, max_shard_size='100KB')
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2
  loaded = {}
  for name in files:
    with safetensors.safe_open(tmp_path / name, framework='numpy') as f:
      loaded.update({key.replace('.', '/'): f.get_tensor(key) for key in f.keys()})
  sizes = llama.hf_sizes(json.loads((tmp_path / 'config.json').read_text()), shapes(loaded))
  assert (sizes.embed, sizes.layers, sizes.q_heads, sizes.kv_heads, sizes.head_dim) == (64, 2, 4, 2, 16)
  out = run(llama.from_hf_transforms(sizes, 'halves', scanned=False, dtype='float32'), loaded)
  assert_same_tensors(bare(out), ref.hf_to_maxtext(tensors, 'halves', scanned=False))


def test_hf_config_json_for_transformers_5():
  sizes = llama.Sizes(embed=64, layers=2, q_heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=256)
  assert llama.hf_config_json(sizes, 'halves', {'rope_theta': 500000, 'bos_token_id': 1}) == {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 256,
      'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4,
      'num_key_value_heads': 2, 'head_dim': 16, 'hidden_act': 'silu', 'rms_norm_eps': 1e-5,
      'max_position_embeddings': 2048,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': 500000.0},
      'tie_word_embeddings': False, 'attention_bias': False, 'mlp_bias': False, 'dtype': 'float32',
      'bos_token_id': 1}
  interleaved = llama.hf_config_json(sizes, 'interleaved')
  assert interleaved['rope_parameters'] == {
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192, 'rope_theta': 500000.0}
  # transformers reads back what was written, MaxText's epsilon included.
  config = transformers.LlamaConfig(**interleaved)
  assert (config.rms_norm_eps, config.head_dim, config.num_key_value_heads) == (1e-5, 16, 2)


@pytest.mark.parametrize('call, message', [
    (lambda s: llama.hf_config_json(s, 'halves', {'hidden_size': 32}),
     'hf_config.hidden_size: the tensors decide it, not the config'),
    (lambda s: llama.hf_config_json(llama.Sizes(60, 2, 8, 2, 16, 128, 256), 'halves'),
     "hidden_size 60 is not a multiple of the 8 query heads, which transformers' LlamaConfig refuses"),
    (lambda s: llama.to_hf_transforms(s, 'rope'), "rotary must be one of 'interleaved', 'halves', got 'rope'"),
    (lambda s: llama.from_hf_transforms(s, 'pairs'), "rotary must be one of 'interleaved', 'halves', got 'pairs'"),
])
def test_config_and_rotary_refusals(call, message):
  sizes = llama.Sizes(64, 2, 4, 2, 16, 128, 256, llama.MaxTextTree(*llama.LINEN, scanned=True))
  with pytest.raises(SurgeryError, match='^' + re.escape(message)):
    call(sizes)


def test_exact_in_binary_when_sqrt_head_dim_is_a_power_of_two():
  assert [d for d in range(1, 300) if llama.exact_in_binary(d)] == [1, 4, 16, 64, 256]
  # head_dim 128: scaling by sqrt(D) and back changes some float32 values.
  x = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
  there = x * np.float32(np.sqrt(128))
  assert (there * np.float32(1 / np.sqrt(128)) != x).any()
  assert (x * np.float32(4) * np.float32(0.25) == x).all()


def maxtext_shapes(e=64, layers=2, nq=4, nkv=2, d=16, f=128, v=256) -> dict[str, tuple]:
  """A scanned Linen MaxText Llama's shapes, as HF.md's table lists them."""
  p = 'params/params/'
  return {f'{p}token_embedder/embedding': (v, e), f'{p}decoder/decoder_norm/scale': (e,),
          f'{p}decoder/logits_dense/kernel': (e, v),
          f'{p}decoder/layers/pre_self_attention_layer_norm/scale': (e, layers),
          f'{p}decoder/layers/post_self_attention_layer_norm/scale': (e, layers),
          f'{p}decoder/layers/self_attention/query/kernel': (e, layers, nq, d),
          f'{p}decoder/layers/self_attention/key/kernel': (e, layers, nkv, d),
          f'{p}decoder/layers/self_attention/value/kernel': (e, layers, nkv, d),
          f'{p}decoder/layers/self_attention/out/kernel': (nq, layers, d, e),
          f'{p}decoder/layers/mlp/wi_0/kernel': (e, layers, f),
          f'{p}decoder/layers/mlp/wi_1/kernel': (e, layers, f),
          f'{p}decoder/layers/mlp/wo/kernel': (f, layers, e),
          'opt_state/0/mu/params/token_embedder/embedding': (v, e), 'step': ()}


def without(shapes_: dict, *keys) -> dict:
  return {k: v for k, v in shapes_.items() if k not in keys}


P = 'params/params/decoder/layers/'
# An unscanned Linen checkpoint's params of layer 0 and the globals.
LAYER_0 = {f'params/params/{k}': v.shape for k, v in random_maxtext(scanned=False).items() if 'layers_1' not in k}


@pytest.mark.parametrize('bad, message', [
    ({'params/Conv_0/kernel': (3, 3)}, 'not a MaxText Llama checkpoint: it has neither params/params/'
     'token_embedder/embedding (Linen) nor token_embedder/embedding/value (NNX)'),
    (without(maxtext_shapes(), f'{P}mlp/wi_1/kernel'),
     f'not a MaxText Llama checkpoint: missing {P}mlp/wi_1/kernel'),
    (without(maxtext_shapes(), f'{P}self_attention/query/kernel'),
     f'not a MaxText Llama checkpoint: missing {P}self_attention/query/kernel (scanned layers) or '
     'params/params/decoder/layers_0/self_attention/query/kernel (unscanned)'),
    ({**maxtext_shapes(), f'{P}self_attention/value/kernel': (64, 2, 2, 32)},
     f'{P}self_attention/value/kernel has shape (64, 2, 2, 32), but the other params make it (64, 2, 2, 16)'),
    ({**maxtext_shapes(), 'params/params/decoder/decoder_norm/scale': (64, 2)},
     'params/params/decoder/decoder_norm/scale has shape (64, 2), but the other params make it (64,)'),
    ({**maxtext_shapes(), f'{P}mlp/wo/kernel': (128, 3, 64)},
     f'{P}mlp/wo/kernel has shape (128, 3, 64), but the other params make it (128, 2, 64)'),
    (maxtext_shapes(nkv=3), f'{P}self_attention/key/kernel: its 3 kv heads do not divide the 4 query heads'),
    (maxtext_shapes(d=15), f'{P}self_attention/query/kernel: head_dim 15 is odd, but a rotary embedding '
     'rotates pairs of it'),
    (without(maxtext_shapes(), 'params/params/decoder/logits_dense/kernel'),
     'params/params/decoder/logits_dense/kernel is missing: the embedding is tied (logits_via_embedding)'),
    ({**maxtext_shapes(), f'{P}self_attention/query/bias': (2, 4, 16)},
     f'{P}self_attention/query/bias is not a parameter of a MaxText Llama'),
    ({k.replace('decoder/layers/', 'decoder/layers_0/'): v for k, v in maxtext_shapes().items()},
     'params/params/decoder/layers_0/self_attention/query/kernel has shape (64, 2, 4, 16), but the '
     'other params make it (64, Nq, D)'),
    ({**LAYER_0, **{k.replace('layers_0', 'layers_2'): v for k, v in LAYER_0.items()}},
     'not a MaxText Llama checkpoint: missing params/params/decoder/layers_1/pre_self_attention_layer_norm/scale'),
], ids=['not maxtext', 'key missing', 'no layers', 'shape', 'rank', 'layer count', 'heads do not divide',
        'odd head_dim', 'tied embedding', 'extra param', 'unscanned with scanned shapes', 'layer missing'])
def test_maxtext_sizes_refuses_what_is_not_a_maxtext_llama(bad, message):
  with pytest.raises(SurgeryError, match='^' + re.escape(message)):
    llama.maxtext_sizes(bad)


HF_CONFIG = {k: v for k, v in ref.hf_config().to_dict().items() if k != 'transformers_version'}
HF_SHAPES = {k: tuple(v.shape) for k, v in ref.maxtext_to_hf(random_maxtext(scanned=True), 'halves').items()}
K_PROJ = 'model/layers/0/self_attn/k_proj/weight'


@pytest.mark.parametrize('config, tensors, message', [
    ({**HF_CONFIG, 'num_key_value_heads': 4}, HF_SHAPES,
     f'config.json (num_key_value_heads=4, head_dim=16) disagrees with {K_PROJ}: shape (32, 64), '
     'expected (64, 64)'),
    ({**HF_CONFIG, 'hidden_size': 32}, HF_SHAPES,
     'config.json (hidden_size=32) disagrees with model/embed_tokens/weight: shape (256, 64), expected (256, 32)'),
    ({**HF_CONFIG, 'intermediate_size': 96}, HF_SHAPES,
     'config.json (intermediate_size=96) disagrees with model/layers/0/mlp/gate_proj/weight: shape '
     '(128, 64), expected (96, 64)'),
    ({**HF_CONFIG, 'num_hidden_layers': 3}, HF_SHAPES,
     'the folder has no tensor model/layers/2/input_layernorm/weight, which config.json '
     '(num_hidden_layers=3) implies'),
    ({**HF_CONFIG, 'num_hidden_layers': 1}, HF_SHAPES,
     'config.json num_hidden_layers 1 disagrees with tensor model/layers/1/input_layernorm/weight'),
    (HF_CONFIG, {k: v for k, v in HF_SHAPES.items() if k != 'lm_head/weight'},
     'the folder has no tensor lm_head/weight'),
    (HF_CONFIG, {**HF_SHAPES, 'model/layers/0/self_attn/q_proj/bias': (64,)},
     'tensor model/layers/0/self_attn/q_proj/bias is not a parameter of a Llama'),
    ({**HF_CONFIG, 'model_type': 'gemma'}, HF_SHAPES,
     "config.json model_type is 'gemma', not a Llama-family model ('llama' or 'mistral')"),
    ({**HF_CONFIG, 'head_dim': 15}, HF_SHAPES,
     'config.json head_dim 15 is odd, but a rotary embedding rotates pairs of it'),
    ({**HF_CONFIG, 'num_key_value_heads': 3}, HF_SHAPES,
     'config.json num_key_value_heads 3 does not divide num_attention_heads 4'),
    ({k: v for k, v in HF_CONFIG.items() if k != 'hidden_size'}, HF_SHAPES, 'config.json has no hidden_size'),
    ({**HF_CONFIG, 'vocab_size': '256'}, HF_SHAPES,
     "config.json vocab_size must be a positive integer, got '256'"),
    ({**HF_CONFIG, 'tie_word_embeddings': True}, HF_SHAPES,
     'config.json tie_word_embeddings is true, but the folder holds lm_head/weight, which transformers '
     'would ignore'),
], ids=['kv heads', 'hidden', 'mlp', 'more layers', 'fewer layers', 'no lm_head', 'bias', 'model_type',
        'odd head_dim', 'heads do not divide', 'no hidden_size', 'not an int', 'tied'])
def test_hf_sizes_refuses_a_config_json_that_disagrees_with_the_tensors(config, tensors, message):
  with pytest.raises(SurgeryError, match='^' + re.escape(message)):
    llama.hf_sizes(config, tensors)
