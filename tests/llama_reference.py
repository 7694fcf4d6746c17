"""What the Llama tests compare with: a tiny random transformers Llama with grouped-query attention,
HF.md's numpy formulas between its tensors and MaxText's layout, and a forward pass of the MaxText
layout written from MaxText's model code (HF.md, "Why each transform").

MaxText param paths here are bare (`decoder/layers/self_attention/query/kernel`): scanned, the layer
axis at 1, or unscanned, `decoder/layers_<i>/...`. HF names are the job's keys, '/' for '.'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

EMBED, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 128, 256
RMS_EPS = 1e-5  # MaxText's normalization_layer_epsilon; transformers' default is 1e-6.
ROPE_THETA = 10000.0
TOKENS = np.random.default_rng(7).integers(0, VOCAB, size=(2, 9))

# The MaxText paths of one layer, with the HF name each becomes (HF.md's table).
LAYER_PATHS = {
    'pre_self_attention_layer_norm/scale': 'input_layernorm/weight',
    'post_self_attention_layer_norm/scale': 'post_attention_layernorm/weight',
    'self_attention/query/kernel': 'self_attn/q_proj/weight',
    'self_attention/key/kernel': 'self_attn/k_proj/weight',
    'self_attention/value/kernel': 'self_attn/v_proj/weight',
    'self_attention/out/kernel': 'self_attn/o_proj/weight',
    'mlp/wi_0/kernel': 'mlp/gate_proj/weight',
    'mlp/wi_1/kernel': 'mlp/up_proj/weight',
    'mlp/wo/kernel': 'mlp/down_proj/weight',
}


def hf_config(tied: bool = False) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
      rms_norm_eps=RMS_EPS, rope_parameters={'rope_type': 'default', 'rope_theta': ROPE_THETA},
      tie_word_embeddings=tied, max_position_embeddings=64)


def hf_model(seed: int = 0, tied: bool = False) -> transformers.LlamaForCausalLM:
  """The tiny Llama, in float32, with weights of unit-scale activations and norms away from 1, so
  that a mistake in any tensor moves the logits far more than 1e-4."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config(tied)).eval()
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if weight.ndim == 1:
        weight.copy_(1 + 0.2 * torch.randn_like(weight))
      elif 'embed_tokens' in name:
        weight.copy_(torch.randn_like(weight))
      else:
        weight.copy_(torch.randn_like(weight) / weight.shape[1] ** 0.5)
  return model


def save_hf(model: transformers.LlamaForCausalLM, folder, max_shard_size='5GB') -> None:
  """As `save_pretrained` writes it: safetensors, sharded when the model exceeds max_shard_size."""
  model.save_pretrained(folder, max_shard_size=max_shard_size)


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray = TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def hf_tensors(model: transformers.LlamaForCausalLM) -> dict[str, np.ndarray]:
  """The model's tensors under the job's keys (`model/layers/0/self_attn/q_proj/weight`)."""
  return {name.replace('.', '/'): t.detach().numpy().copy() for name, t in model.state_dict().items()}


def halves(x: np.ndarray) -> np.ndarray:
  """Interleaved pairs (2j, 2j+1) of the last axis to halves (j, j + D/2)."""
  return np.concatenate([x[..., 0::2], x[..., 1::2]], -1)


def interleaved(x: np.ndarray) -> np.ndarray:
  d = x.shape[-1]
  return np.stack([x[..., :d // 2], x[..., d // 2:]], -1).reshape(x.shape)


def layer_params(params: dict, i: int) -> dict[str, np.ndarray]:
  """Layer i's params by their path within a layer, from a scanned or an unscanned tree."""
  if 'decoder/layers/self_attention/query/kernel' in params:
    return {path: np.take(params[f'decoder/layers/{path}'], i, axis=1) for path in LAYER_PATHS}
  return {path: params[f'decoder/layers_{i}/{path}'] for path in LAYER_PATHS}


def maxtext_to_hf(params: dict, rotary: str) -> dict[str, np.ndarray]:
  """HF.md's formulas, which reproduce MaxText's export bit for bit (float32 in, float32 out)."""
  embed = params['token_embedder/embedding'].shape[1]
  head_dim = layer_params(params, 0)['self_attention/query/kernel'].shape[-1]
  order = halves if rotary == 'interleaved' else (lambda x: x)
  out = {'model/embed_tokens/weight': params['token_embedder/embedding'],
         'model/norm/weight': params['decoder/decoder_norm/scale'],
         'lm_head/weight': params['decoder/logits_dense/kernel'].T}
  i = 0
  while _has_layer(params, i):
    p = layer_params(params, i)
    q = p['self_attention/query/kernel']
    hf = {
        'input_layernorm/weight': p['pre_self_attention_layer_norm/scale'],
        'post_attention_layernorm/weight': p['post_self_attention_layer_norm/scale'],
        'self_attn/q_proj/weight': order(
            (q.astype(np.float32) * np.float32(np.sqrt(head_dim))).astype(q.dtype)).reshape(embed, -1).T,
        'self_attn/k_proj/weight': order(p['self_attention/key/kernel']).reshape(embed, -1).T,
        'self_attn/v_proj/weight': p['self_attention/value/kernel'].reshape(embed, -1).T,
        'self_attn/o_proj/weight': p['self_attention/out/kernel'].reshape(-1, embed).T,
        'mlp/gate_proj/weight': p['mlp/wi_0/kernel'].T,
        'mlp/up_proj/weight': p['mlp/wi_1/kernel'].T,
        'mlp/down_proj/weight': p['mlp/wo/kernel'].T,
    }
    out.update({f'model/layers/{i}/{name}': x for name, x in hf.items()})
    i += 1
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _has_layer(params: dict, i: int) -> bool:
  scanned = params.get('decoder/layers/self_attention/query/kernel')
  if scanned is not None:
    return i < scanned.shape[1]
  return f'decoder/layers_{i}/self_attention/query/kernel' in params


def hf_to_maxtext(hf: dict, rotary: str, scanned: bool, q_heads: int = Q_HEADS,
                  kv_heads: int = KV_HEADS) -> dict[str, np.ndarray]:
  """The inverse of HF.md's formulas: to MaxText reshape -> interleave (for 'interleaved') ->
  x 1/sqrt(D), in float32."""
  embed = hf['model/embed_tokens/weight'].shape[1]
  head_dim = hf['model/layers/0/self_attn/q_proj/weight'].shape[0] // q_heads
  layers = sum(1 for k in hf if k.endswith('/self_attn/q_proj/weight'))
  order = interleaved if rotary == 'interleaved' else (lambda x: x)
  per_layer = []
  for i in range(layers):
    t = {name: hf[f'model/layers/{i}/{name}'] for name in LAYER_PATHS.values()}
    q = order(t['self_attn/q_proj/weight'].T.reshape(embed, q_heads, head_dim))
    per_layer.append({
        'pre_self_attention_layer_norm/scale': t['input_layernorm/weight'],
        'post_self_attention_layer_norm/scale': t['post_attention_layernorm/weight'],
        'self_attention/query/kernel': (q.astype(np.float32) * np.float32(1 / np.sqrt(head_dim))).astype(q.dtype),
        'self_attention/key/kernel': order(t['self_attn/k_proj/weight'].T.reshape(embed, kv_heads, head_dim)),
        'self_attention/value/kernel': t['self_attn/v_proj/weight'].T.reshape(embed, kv_heads, head_dim),
        'self_attention/out/kernel': t['self_attn/o_proj/weight'].T.reshape(q_heads, head_dim, embed),
        'mlp/wi_0/kernel': t['mlp/gate_proj/weight'].T,
        'mlp/wi_1/kernel': t['mlp/up_proj/weight'].T,
        'mlp/wo/kernel': t['mlp/down_proj/weight'].T,
    })
  out = {'token_embedder/embedding': hf['model/embed_tokens/weight'],
         'decoder/decoder_norm/scale': hf['model/norm/weight'],
         'decoder/logits_dense/kernel': hf['lm_head/weight'].T}
  for path in LAYER_PATHS:
    if scanned:
      out[f'decoder/layers/{path}'] = np.stack([layer[path] for layer in per_layer], axis=1)
    else:
      out.update({f'decoder/layers_{i}/{path}': layer[path] for i, layer in enumerate(per_layer)})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _rms_norm(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotate(x, rotary: str, theta: float):
  """x (B, T, N, D) at positions 0..T-1: MaxText's RotaryEmbedding ('halves': pairs (j, j+D/2)) or
  LLaMARotaryEmbedding without llama3.1 scaling ('interleaved': pairs (2j, 2j+1))."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None] * inv_freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  if rotary == 'halves':
    first, second = x[..., :d // 2], x[..., d // 2:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
  even, odd = x[..., 0::2], x[..., 1::2]
  return jnp.stack([even * cos - odd * sin, odd * cos + even * sin], -1).reshape(x.shape)


def maxtext_logits(params: dict, rotary: str, tokens: np.ndarray = TOKENS, eps: float = RMS_EPS,
                   theta: float = ROPE_THETA) -> np.ndarray:
  """MaxText's Llama forward in float32: the query kernel carries the 1/sqrt(D) scale (attention
  scale 1), consecutive query heads share a kv head, RMSNorm with MaxText's epsilon."""
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  x = p['token_embedder/embedding'][jnp.asarray(tokens)]
  length = x.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  i = 0
  while _has_layer(params, i):
    layer = {k: jnp.asarray(v, jnp.float32) for k, v in layer_params(params, i).items()}
    h = _rms_norm(x, layer['pre_self_attention_layer_norm/scale'], eps)
    q = _rotate(jnp.einsum('bte,end->btnd', h, layer['self_attention/query/kernel']), rotary, theta)
    k = _rotate(jnp.einsum('bte,end->btnd', h, layer['self_attention/key/kernel']), rotary, theta)
    v = jnp.einsum('bte,end->btnd', h, layer['self_attention/value/kernel'])
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k)
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    attended = jnp.einsum('bkgts,bskd->btkgd', weights, v).reshape(batch, length, q_heads, head_dim)
    x = x + jnp.einsum('btnd,nde->bte', attended, layer['self_attention/out/kernel'])
    h = _rms_norm(x, layer['post_self_attention_layer_norm/scale'], eps)
    gated = jax.nn.silu(h @ layer['mlp/wi_0/kernel']) * (h @ layer['mlp/wi_1/kernel'])
    x = x + gated @ layer['mlp/wo/kernel']
    i += 1
  x = _rms_norm(x, p['decoder/decoder_norm/scale'], eps)
  return np.asarray(x @ p['decoder/logits_dense/kernel'])
