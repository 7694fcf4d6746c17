"""Scanned to unscanned layers: split `layers/...` along the layer axis into `layers_N/...`.

  surgery-job --config=configs/unscan_layers.py:layers \
      --config.input.path=IN --config.output.path=OUT
  surgery-job --config=configs/unscan_layers.py:decoder/layers,1 \
      --config.input.path=IN --config.output.path=OUT

The argument is `PREFIX[,AXIS]`: the layer prefix (default `layers`) and the layer axis (default 0;
MaxText scans on axis 1, its `param_scan_axis`). Every leaf under the prefix must have the same size
on that axis, else the job stops naming the leaves and their sizes. Moments are split the same way.
"""

from surgery_job.config import get_default_config


def get_config(arg: str = 'layers'):
  prefix, _, axis = arg.partition(',')
  config = get_default_config()
  config.transforms = [
      dict(op='unstack', pattern=rf'{prefix}/(.*)', replacement=rf'{prefix}_{{i}}/\1',
           axis=int(axis or 0)),
  ]
  config.output.custom_metadata = {'scan_layers': False}  # What MaxText checks on load.
  return config
