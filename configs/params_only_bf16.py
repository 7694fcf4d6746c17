"""Serving export: drop the optimizer state and cast every parameter to bfloat16.

  surgery-job --config=configs/params_only_bf16.py --config.input.path=IN --config.output.path=OUT
"""

from surgery_job.config import get_default_config


def get_config():
  config = get_default_config()
  config.transforms = [
      dict(op='drop_optimizer'),
      dict(op='cast', pattern='.*', dtype='bfloat16'),
  ]
  return config
