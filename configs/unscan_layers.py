"""Scanned to unscanned layers: split `layers/...` along axis 0 into `layers_0/...`, `layers_1/...`.

  surgery-job --config=configs/unscan_layers.py:layers \
      --config.input.path=IN --config.output.path=OUT

The argument is the layer prefix (default `layers`). Moments are split the same way.
"""

from surgery_job.config import get_default_config


def get_config(prefix: str = 'layers'):
  config = get_default_config()
  config.transforms = [
      dict(op='unstack', pattern=rf'{prefix}/(.*)', replacement=rf'{prefix}_{{i}}/\1', axis=0),
  ]
  return config
