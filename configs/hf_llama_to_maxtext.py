"""A Hugging Face Llama-family folder (one safetensors file or sharded, with its config.json) to an
Orbax checkpoint MaxText loads with `load_parameters_path=OUT/0/items`: Linen params as MaxText's
`to_maxtext` writes them, in bfloat16, and the step's `custom_metadata` saying `scan_layers`.

  surgery-job --config=configs/hf_llama_to_maxtext.py --config.input.path=HF_FOLDER \
      --config.output.path=OUT
  surgery-job --config=configs/hf_llama_to_maxtext.py:unscanned,float32 \
      --config.input.path=HF_FOLDER --config.output.path=OUT

The argument is `LAYERS[,DTYPE]`: `scanned` (the default: layers stacked on axis 1, MaxText's
`param_scan_axis`) or `unscanned` (`decoder/layers_<i>/...`), and the weights' dtype (default
bfloat16, as to_maxtext). The rotary layout is `transforms.0.rotary` (default `interleaved`, the
inverse of MaxText's exporter; `halves` for a model whose MaxText RoPE rotates halves). config.json
must agree with the tensors. The query is divided by sqrt(head_dim): the run's report says when
that is not exact in binary (head_dim 128). Every weight is read in row blocks over the devices
(safetensors record no sharding): the rule shards each tensor's first axis over `data`.
"""

from surgery_job.config import get_default_config


def get_config(arg: str = 'scanned'):
  layers, _, dtype = arg.partition(',')
  if layers not in ('scanned', 'unscanned'):
    raise ValueError(f"hf_llama_to_maxtext: LAYERS must be 'scanned' or 'unscanned', got {layers!r}")
  scanned = layers == 'scanned'
  config = get_default_config()
  config.input.format = 'safetensors'
  config.transforms = [dict(op='llama_from_hf', rotary='interleaved', scanned=scanned,
                            dtype=dtype or 'bfloat16')]
  config.partition_rules = [(r'weight$', ('data',))]
  config.output.step = 0
  config.output.item = 'items'
  config.output.custom_metadata = {'scan_layers': scanned}  # What MaxText checks on load.
  return config
