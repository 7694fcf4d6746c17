"""Hugging Face export: the parameters alone, as safetensors named with '.' for '/'.

`params/layers_0/mlp/kernel` becomes `layers_0.mlp.kernel` (names that a model's own loader expects
need a `rename` more: the mapping is the model's).

  surgery-job --config=configs/export_safetensors.py --config.input.path=IN --config.output.path=OUT

Add `--config.output.max_shard_size=2GB` for smaller shards, and the model's config.json and
tokenizer files with `output.extra_files`.
"""

from surgery_job.config import get_default_config


def get_config():
  config = get_default_config()
  config.transforms = [
      dict(op='drop_optimizer'),
      dict(op='keep', pattern='/params/.*'),
      dict(op='rename', pattern='/params/(.*)', replacement=r'/\1'),
  ]
  config.output.format = 'safetensors'
  return config
