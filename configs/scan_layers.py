"""Unscanned to scanned layers: stack `layers_0/...`, `layers_1/...` into `layers/...` on a new axis 0.

  surgery-job --config=configs/scan_layers.py:layers \
      --config.input.path=IN --config.output.path=OUT

The argument is the layer prefix (default `layers`), as `nn.scan` over `variable_axes={'params': 0}`
expects. Moments are stacked the same way; the new axis is replicated.
"""

from surgery_job.config import get_default_config


def get_config(prefix: str = 'layers'):
  config = get_default_config()
  config.transforms = [
      dict(op='stack', pattern=rf'{prefix}_(\d+)/(.*)', replacement=rf'{prefix}/\2', axis=0),
  ]
  return config
