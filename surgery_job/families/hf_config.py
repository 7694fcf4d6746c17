"""A Hugging Face config.json (transformers 5.x fields) with what a user sets over it:
`output.hf_config.<field>` for what the tensors' shapes cannot tell."""

from typing import Any, Mapping

from surgery_job.errors import SurgeryError

# Fields the tensors' shapes decide: an override would make config.json disagree with them.
SHAPE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                'num_attention_heads', 'num_key_value_heads', 'head_dim', 'tie_word_embeddings')


def with_overrides(config_json: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """`config_json` with `overrides` set over it: `rope_parameters` replaces the rotary embedding's
  parameters, `rope_theta` sets their theta (transformers 5 keeps it there), any other field is
  set as given; a field the shapes decide is refused."""
  overrides = dict(overrides or {})
  for field in SHAPE_FIELDS:
    if field in overrides:
      raise SurgeryError(f'hf_config.{field}: the tensors decide it, not the config')
  out = dict(config_json)
  if 'rope_parameters' in overrides:
    out['rope_parameters'] = dict(overrides.pop('rope_parameters'))
  if 'rope_theta' in overrides:
    out['rope_parameters'] = {**out.get('rope_parameters', {}),
                              'rope_theta': float(overrides.pop('rope_theta'))}
  out.update(overrides)
  return out
