"""Unscanned to scanned layers: stack `layers_0/...`, `layers_1/...` into `layers/...` on a new axis.

  surgery-job --config=configs/scan_layers.py:layers \
      --config.input.path=IN --config.output.path=OUT
  surgery-job --config=configs/scan_layers.py:decoder/layers,1 \
      --config.input.path=IN --config.output.path=OUT

The argument is `PREFIX[,AXIS]`: the layer prefix (default `layers`) and the new layer axis (default
0, as `nn.scan` over `variable_axes={'params': 0}` expects; MaxText's `param_scan_axis` is 1). Every
stacked leaf must have the same number of layers. Moments are stacked the same way; the new axis is
replicated.
"""

from surgery_job.config import get_default_config


def get_config(arg: str = 'layers'):
  prefix, _, axis = arg.partition(',')
  config = get_default_config()
  config.transforms = [
      dict(op='stack', pattern=rf'{prefix}_(\d+)/(.*)', replacement=rf'{prefix}/\2',
           axis=int(axis or 0)),
  ]
  config.output.custom_metadata = {'scan_layers': True}  # What MaxText checks on load.
  return config
