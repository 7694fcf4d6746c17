"""The Llama family (Llama 2, 3, 3.1, 3.3, Mistral) between MaxText and Hugging Face: which keys and
shapes make one, and the job's ops that carry it from one layout to the other (HF.md's table).

Pure Python on {key: shape} dicts, so that a checkpoint's metadata is checked before any data moves.
The ops name full keys (a leading '/'): the HF names are top-level keys, wherever the params were.
HF names are the job's keys, '/' where the safetensors name has '.'.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from surgery_job.errors import SurgeryError
from surgery_job.families import hf_config
from surgery_job.transforms.heads import ROTARY_LAYOUTS

# MaxText path within a layer -> (HF name within a layer, MaxText shape of one layer, HF shape).
LAYER_PARAMS = {
    'pre_self_attention_layer_norm/scale': ('input_layernorm/weight', 'E', 'E'),
    'post_self_attention_layer_norm/scale': ('post_attention_layernorm/weight', 'E', 'E'),
    'self_attention/query/kernel': ('self_attn/q_proj/weight', 'E Nq D', 'NqD E'),
    'self_attention/key/kernel': ('self_attn/k_proj/weight', 'E Nkv D', 'NkvD E'),
    'self_attention/value/kernel': ('self_attn/v_proj/weight', 'E Nkv D', 'NkvD E'),
    'self_attention/out/kernel': ('self_attn/o_proj/weight', 'Nq D E', 'E NqD'),
    'mlp/wi_0/kernel': ('mlp/gate_proj/weight', 'E F', 'F E'),
    'mlp/wi_1/kernel': ('mlp/up_proj/weight', 'E F', 'F E'),
    'mlp/wo/kernel': ('mlp/down_proj/weight', 'F E', 'E F'),
}
# MaxText path -> (HF name, MaxText shape, HF shape).
GLOBAL_PARAMS = {
    'token_embedder/embedding': ('model/embed_tokens/weight', 'V E', 'V E'),
    'decoder/decoder_norm/scale': ('model/norm/weight', 'E', 'E'),
    'decoder/logits_dense/kernel': ('lm_head/weight', 'E V', 'V E'),
}
QUERY, KEY, VALUE, OUT = (f'self_attention/{name}/kernel' for name in ('query', 'key', 'value', 'out'))
# The config.json field each size comes from.
HF_FIELDS = {'V': 'vocab_size', 'E': 'hidden_size', 'F': 'intermediate_size', 'L': 'num_hidden_layers',
             'Nq': 'num_attention_heads', 'Nkv': 'num_key_value_heads', 'D': 'head_dim'}
# MaxText's RMSNorm epsilon (normalization_layer_epsilon); transformers' default is 1e-6.
MAXTEXT_RMS_NORM_EPS = 1e-5
# What config.json says of the rotary embedding when the job is not told: 'interleaved' is MaxText's
# LLaMARotaryEmbedding with its default llama3.1 frequency scaling (as MaxText's exporter writes
# llama3.1-8b), 'halves' its plain RotaryEmbedding at base.yml's theta.
ROPE_DEFAULTS: dict[str, dict[str, Any]] = {
    'interleaved': dict(max_position_embeddings=131072, rope_parameters={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 8192, 'rope_theta': 500000.0}),
    'halves': dict(max_position_embeddings=2048,
                   rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0}),
}


LINEN = ('params/params/', '')  # (prefix, suffix) of a param path.
NNX = ('', '/value')


@dataclasses.dataclass(frozen=True)
class MaxTextTree:
  """Where a MaxText checkpoint keeps the params: Linen `params/params/<path>`, NNX `<path>/value`."""
  prefix: str
  suffix: str
  scanned: bool  # Layers stacked on axis 1 (`decoder/layers/...`), or `decoder/layers_<i>/...`.

  def key(self, path: str) -> str:
    return self.prefix + path + self.suffix

  def layer_key(self, path: str, layer: int | None = None) -> str:
    return self.key(f'decoder/layers/{path}' if layer is None else f'decoder/layers_{layer}/{path}')


@dataclasses.dataclass(frozen=True)
class Sizes:
  embed: int  # E
  layers: int  # L
  q_heads: int  # Nq
  kv_heads: int  # Nkv
  head_dim: int  # D
  mlp: int  # F
  vocab: int  # V
  tree: MaxTextTree | None = None  # Where a MaxText checkpoint holds them; None for an HF folder.
  tied_embedding: bool = False  # An HF folder without lm_head: it is the embedding.

  def letters(self) -> dict[str, int]:
    return {'E': self.embed, 'L': self.layers, 'Nq': self.q_heads, 'Nkv': self.kv_heads,
            'D': self.head_dim, 'F': self.mlp, 'V': self.vocab,
            'NqD': self.q_heads * self.head_dim, 'NkvD': self.kv_heads * self.head_dim}


def maxtext_sizes(shapes: Mapping[str, Sequence[int]], prefix: str = '') -> Sizes:
  """The sizes of a MaxText Llama from a checkpoint's {full key: shape}, the tree found under
  `prefix` (a folder holding it, as MaxText's loader reads one under `base`): Linen or NNX, scanned
  or not. Anything that is not such a tree fails in one line naming the key."""
  outer = prefix.strip('/') + '/' if prefix.strip('/') else ''
  layouts = [(outer + p, s) for p, s in (LINEN, NNX) if outer + p + 'token_embedder/embedding' + s in shapes]
  if not layouts:
    raise SurgeryError(f'not a MaxText Llama checkpoint: it has neither {outer}params/params/token_embedder/'
                       f'embedding (Linen) nor {outer}token_embedder/embedding/value (NNX)')
  tree_prefix, suffix = layouts[0]
  scanned = MaxTextTree(tree_prefix, suffix, True)
  unscanned = MaxTextTree(tree_prefix, suffix, False)
  if scanned.layer_key(QUERY) in shapes:
    tree = scanned
  elif unscanned.layer_key(QUERY, 0) in shapes:
    tree = unscanned
  else:
    raise SurgeryError(f'not a MaxText Llama checkpoint: missing {scanned.layer_key(QUERY)} (scanned '
                       f'layers) or {unscanned.layer_key(QUERY, 0)} (unscanned)')
  logits = tree.key('decoder/logits_dense/kernel')
  if logits not in shapes:
    raise SurgeryError(
        f'{logits} is missing: the embedding is tied (logits_via_embedding), and MaxText then divides '
        'the logits by sqrt(emb_dim), which a tied Hugging Face lm_head cannot express; untie it first')
  # Linen keeps nothing but params under params/params; NNX's `.../value` leaves may sit beside others.
  roots = (tree.prefix + 'decoder/', tree.prefix + 'token_embedder/') if tree.suffix else (tree.prefix,)
  ours = {key for key in shapes if key.startswith(roots) and key.endswith(tree.suffix)}
  known = {}
  if not tree.scanned:
    indices = {int(m.group(1)) for key in ours
               if (m := re.fullmatch(re.escape(tree.prefix) + r'decoder/layers_(\d+)/.*', key))}
    known['L'] = max(indices) + 1
  expected = _maxtext_shapes(tree, known.get('L', 1))
  # The keys that give the sizes first, then every key checked against them.
  for path in ('token_embedder/embedding', QUERY, KEY, 'mlp/wi_0/kernel'):
    key = _first(expected, path)
    if key not in shapes:
      raise SurgeryError(f'not a MaxText Llama checkpoint: missing {key}')
    _read_sizes(key, shapes[key], expected[key], known)
  if known['D'] % 2:
    raise SurgeryError(f'{_first(expected, QUERY)}: head_dim {known["D"]} is odd, but a rotary '
                       'embedding rotates pairs of it')
  if known['Nq'] % known['Nkv']:
    raise SurgeryError(f'{_first(expected, KEY)}: its {known["Nkv"]} kv heads do not divide the '
                       f'{known["Nq"]} query heads')
  for key, template in expected.items():
    if key not in shapes:
      raise SurgeryError(f'not a MaxText Llama checkpoint: missing {key}')
    _read_sizes(key, shapes[key], template, known)
  extra = sorted(ours - expected.keys())
  if extra:
    raise SurgeryError(f'{extra[0]} is not a parameter of a MaxText Llama')
  return Sizes(known['E'], known['L'], known['Nq'], known['Nkv'], known['D'], known['F'], known['V'], tree)


def _first(expected: Mapping[str, str], path: str) -> str:
  return next(k for k in expected if path in k)


def _maxtext_shapes(tree: MaxTextTree, layers: int) -> dict[str, str]:
  """{key: shape template ('E L Nq D')} of every param in `tree`; `layers` counts unscanned ones."""
  out = {tree.key(path): template for path, (_, template, _) in GLOBAL_PARAMS.items()}
  for i in range(1 if tree.scanned else layers):
    for path, (_, template, _) in LAYER_PARAMS.items():
      if tree.scanned:
        first, *rest = template.split()
        out[tree.layer_key(path)] = ' '.join([first, 'L', *rest])
      else:
        out[tree.layer_key(path, i)] = template
  return out


def _read_sizes(key: str, shape: Sequence[int], template: str, known: dict[str, int],
                fields: Mapping[str, str] | None = None) -> None:
  """Learns the sizes `shape` gives the letters of `template` that `known` lacks, and fails naming
  `key` where it disagrees with the others (naming the config.json fields behind them, if given)."""
  letters = template.split()
  shape = tuple(int(s) for s in shape)
  wrong = len(shape) != len(letters)
  for letter, size in zip(letters, shape):
    if wrong or letter in known and known[letter] != size:
      wrong = True
    else:
      known[letter] = size
  if wrong:
    want = '(' + ', '.join(str(known.get(letter, letter)) for letter in letters) + (
        ',)' if len(letters) == 1 else ')')
    if fields is None:
      raise SurgeryError(f'{key} has shape {shape}, but the other params make it {want}')
    differing = [letter for letter, size in zip(letters, shape) if known[letter] != size
                 ] if len(shape) == len(letters) else letters
    blamed = dict.fromkeys(part for letter in differing for part in re.findall('Nkv|Nq|[A-Z]', letter))
    named = ', '.join(f'{fields[part]}={known[part]}' for part in blamed)
    raise SurgeryError(f'config.json ({named}) disagrees with {key}: shape {shape}, expected {want}')


def hf_sizes(config_json: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> Sizes:
  """The sizes of a Hugging Face Llama from its config.json and its tensors' {key: shape}, which
  must agree: a disagreement fails in one line naming the config.json field and the tensor."""
  model_type = config_json.get('model_type')
  if model_type not in ('llama', 'mistral'):
    raise SurgeryError(f'config.json model_type is {model_type!r}, not a Llama-family model '
                       "('llama' or 'mistral')")
  for field, allowed in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if config_json.get(field, allowed) != allowed:
      raise SurgeryError(f'config.json {field} is {config_json[field]!r}; the Llama mapping expects '
                         f'{allowed!r}')
  sizes = {}
  for letter in ('V', 'E', 'F', 'L', 'Nq'):
    sizes[letter] = _positive(config_json, HF_FIELDS[letter])
  sizes['Nkv'] = _positive(config_json, 'num_key_value_heads', sizes['Nq'])
  if config_json.get('head_dim') is None and sizes['E'] % sizes['Nq']:
    raise SurgeryError(f'config.json hidden_size {sizes["E"]} is not a multiple of num_attention_heads '
                       f'{sizes["Nq"]} and head_dim is not given')
  sizes['D'] = _positive(config_json, 'head_dim', sizes['E'] // sizes['Nq'])
  if sizes['D'] % 2:
    raise SurgeryError(f'config.json head_dim {sizes["D"]} is odd, but a rotary embedding rotates pairs of it')
  if sizes['Nq'] % sizes['Nkv']:
    raise SurgeryError(f'config.json num_key_value_heads {sizes["Nkv"]} does not divide '
                       f'num_attention_heads {sizes["Nq"]}')
  tied = config_json.get('tie_word_embeddings', False)
  if tied and 'lm_head/weight' in shapes:
    raise SurgeryError('config.json tie_word_embeddings is true, but the folder holds lm_head/weight, '
                       'which transformers would ignore')
  result = Sizes(sizes['E'], sizes['L'], sizes['Nq'], sizes['Nkv'], sizes['D'], sizes['F'], sizes['V'],
                 tied_embedding=bool(tied))
  expected = hf_shapes(result)
  for key, template in expected.items():
    if key not in shapes:
      raise SurgeryError(f'the folder has no tensor {key}, which config.json '
                         f'({HF_FIELDS["L"]}={sizes["L"]}) implies')
    _read_sizes(key, shapes[key], template, result.letters(), HF_FIELDS)
  for key in sorted(shapes):
    if key not in expected:
      layer = re.fullmatch(r'model/layers/(\d+)/.*', key)
      if layer and int(layer.group(1)) >= sizes['L']:
        raise SurgeryError(f'config.json num_hidden_layers {sizes["L"]} disagrees with tensor {key}')
      raise SurgeryError(f'tensor {key} is not a parameter of a Llama')
  return result


def _positive(config_json: Mapping[str, Any], field: str, default: int | None = None) -> int:
  value = config_json.get(field)
  if value is None and default is not None:
    return default
  if value is None:
    raise SurgeryError(f'config.json has no {field}')
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise SurgeryError(f'config.json {field} must be a positive integer, got {value!r}')
  return value


def hf_shapes(sizes: Sizes) -> dict[str, str]:
  """{HF key: shape template} of every tensor an HF Llama folder with `sizes` holds."""
  out = {hf: template for hf, _, template in GLOBAL_PARAMS.values()
         if not (hf == 'lm_head/weight' and sizes.tied_embedding)}
  for i in range(sizes.layers):
    out.update({f'model/layers/{i}/{hf}': template for hf, _, template in LAYER_PARAMS.values()})
  return out


def _check_rotary(rotary: str) -> None:
  if rotary not in ROTARY_LAYOUTS:
    raise SurgeryError(f"rotary must be one of {', '.join(map(repr, ROTARY_LAYOUTS))}, got {rotary!r}")


def _full(key: str) -> str:
  """A full-key pattern matching exactly `key`."""
  return '/' + re.escape(key)


def to_hf_transforms(sizes: Sizes, rotary: str, dtype: str = 'float32') -> list[dict]:
  """The ops that take a MaxText Llama checkpoint (`sizes.tree`) to Hugging Face's tensors, in
  MaxText's export order: scale -> rotary -> merge heads -> transpose. The values are computed in
  float32 (MaxText's exporter restores weight_dtype float32), and written as `dtype`."""
  _check_rotary(rotary)
  tree = sizes.tree
  if tree is None:
    raise ValueError('to_hf_transforms needs the sizes of a MaxText checkpoint (maxtext_sizes)')
  prefix, suffix = re.escape(tree.prefix), re.escape(tree.suffix)
  layer_paths = '|'.join(map(re.escape, LAYER_PARAMS))
  global_paths = '|'.join(map(re.escape, GLOBAL_PARAMS))

  def layer(path_pattern):
    return rf'/{prefix}decoder/layers_(\d+)/{path_pattern}{suffix}'
  ops = [
      dict(op='drop_optimizer'),
      # Only the params go to HF: the step, rng keys and anything else stay behind.
      dict(op='keep', pattern=rf'/{prefix}({global_paths}|decoder/layers(_\d+)?/({layer_paths})){suffix}'),
      dict(op='cast', pattern='/.*', dtype='float32'),
  ]
  if tree.scanned:
    ops.append(dict(op='unstack', pattern=rf'/{prefix}decoder/layers/(.+)',
                    replacement=f'/{tree.prefix}decoder/layers_{{i}}/\\1', axis=1, count=sizes.layers))
  # MaxText folds the attention's 1/sqrt(D) into the query kernel; HF scales q.k by it.
  ops.append(dict(op='scale', pattern=layer(re.escape(QUERY)), factor=math.sqrt(sizes.head_dim)))
  if rotary == 'interleaved':
    ops.append(dict(op='rotary', pattern=layer('self_attention/(query|key)/kernel'), to='halves'))
  ops += [
      dict(op='merge_heads', pattern=layer('self_attention/(query|key|value)/kernel'), axis=1),
      dict(op='merge_heads', pattern=layer(re.escape(OUT)), axis=0),
      dict(op='transpose', pattern=rf'/{prefix}(decoder/logits_dense/kernel|decoder/layers_\d+/'
                                   rf'(self_attention/\w+|mlp/\w+)/kernel){suffix}', axes=[1, 0]),
  ]
  for path, (hf, _, _) in GLOBAL_PARAMS.items():
    ops.append(dict(op='rename', pattern=_full(tree.key(path)), replacement=f'/{hf}'))
  for path, (hf, _, _) in LAYER_PARAMS.items():
    ops.append(dict(op='rename', pattern=layer(re.escape(path)), replacement=rf'/model/layers/\1/{hf}'))
  if dtype != 'float32':
    ops.append(dict(op='cast', pattern='/.*', dtype=dtype))
  return ops


def from_hf_transforms(sizes: Sizes, rotary: str, scanned: bool = True,
                       dtype: str = 'bfloat16') -> list[dict]:
  """The ops that take a Hugging Face Llama's tensors to MaxText's Linen params, as MaxText's
  to_maxtext writes them (`params/params/<path>` and a `step`), in its order: transpose -> split
  heads -> rotary -> scale by 1/sqrt(D). Computed in float32, written as `dtype` (to_maxtext's
  default is bfloat16)."""
  _check_rotary(rotary)
  tree = MaxTextTree(*LINEN, scanned=False)

  def layer(hf_pattern):
    return rf'/model/layers/(\d+)/{hf_pattern}'

  def hf_name(path):
    return re.escape(LAYER_PARAMS[path][0])
  heads = [(QUERY, sizes.q_heads), (KEY, sizes.kv_heads), (VALUE, sizes.kv_heads)]
  # MaxText's llama ymls untie (logits_via_embedding false): a tied lm_head becomes its own kernel.
  ops = [dict(op='copy', source='/model/embed_tokens/weight', target='/lm_head/weight')
         ] if sizes.tied_embedding else []
  ops += [
      dict(op='cast', pattern='/.*', dtype='float32'),
      dict(op='transpose', pattern=r'/(lm_head|model/layers/\d+/(self_attn|mlp)/\w+_proj)/weight',
           axes=[1, 0]),
      *(dict(op='split_heads', pattern=layer(hf_name(path)), axis=1, heads=n) for path, n in heads),
      dict(op='split_heads', pattern=layer(hf_name(OUT)), axis=0, heads=sizes.q_heads),
  ]
  if rotary == 'interleaved':
    ops.append(dict(op='rotary', pattern=layer(r'self_attn/(q|k)_proj/weight'), to='interleaved'))
  ops.append(dict(op='scale', pattern=layer(hf_name(QUERY)), factor=1 / math.sqrt(sizes.head_dim)))
  for path, (hf, _, _) in GLOBAL_PARAMS.items():
    ops.append(dict(op='rename', pattern=_full(hf), replacement='/' + tree.key(path)))
  for path, (hf, _, _) in LAYER_PARAMS.items():
    ops.append(dict(op='rename', pattern=layer(re.escape(hf)),
                    replacement='/' + tree.key(rf'decoder/layers_\1/{path}')))
  if scanned:
    layers = re.escape(tree.prefix) + r'decoder/layers'
    ops.append(dict(op='stack', pattern=rf'/{layers}_(\d+)/(.+)',
                    replacement=f'/{tree.prefix}decoder/layers/\\2', axis=1, count=sizes.layers))
  if dtype != 'float32':
    ops.append(dict(op='cast', pattern='/.*', dtype=dtype))
  ops.append(dict(op='set_step', value=0))
  return ops


def hf_config_json(sizes: Sizes, rotary: str, overrides: Mapping[str, Any] | None = None,
                   dtype: str = 'float32') -> dict[str, Any]:
  """config.json of the LlamaForCausalLM with `sizes` (transformers 5.x fields): MaxText's RMSNorm
  epsilon, the rotary embedding's defaults (ROPE_DEFAULTS), then `overrides` for what shapes
  cannot tell (`rope_theta` sets rope_parameters' theta; token ids, max_position_embeddings...)."""
  _check_rotary(rotary)
  if sizes.embed % sizes.q_heads:
    raise SurgeryError(f'hidden_size {sizes.embed} is not a multiple of the {sizes.q_heads} query heads, '
                       "which transformers' LlamaConfig refuses even with head_dim given")
  defaults = ROPE_DEFAULTS[rotary]
  return hf_config.with_overrides({
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': sizes.vocab,
      'hidden_size': sizes.embed,
      'intermediate_size': sizes.mlp,
      'num_hidden_layers': sizes.layers,
      'num_attention_heads': sizes.q_heads,
      'num_key_value_heads': sizes.kv_heads,
      'head_dim': sizes.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': MAXTEXT_RMS_NORM_EPS,
      'max_position_embeddings': defaults['max_position_embeddings'],
      'rope_parameters': dict(defaults['rope_parameters']),
      'tie_word_embeddings': False,
      'attention_bias': False,
      'mlp_bias': False,
      'dtype': dtype,
  }, overrides)


def exact_in_binary(head_dim: int) -> bool:
  """Whether scaling the query by sqrt(head_dim) and back is exact: sqrt(D) a power of two, D a
  power of four (16, 64, 256; not 128, where a round trip changes low bits)."""
  return head_dim > 0 and head_dim & (head_dim - 1) == 0 and (head_dim.bit_length() - 1) % 2 == 0
