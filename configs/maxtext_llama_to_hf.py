"""A MaxText Llama-family checkpoint (Llama 2, 3, 3.1, 3.3, Mistral) to a Hugging Face folder that
transformers loads: safetensors in float32, as MaxText's exporter writes them, and config.json.

  surgery-job --config=configs/maxtext_llama_to_hf.py --config.input.path=RUN/checkpoints \
      --config.output.path=OUT --config.input.step=1000
  surgery-job --config=configs/maxtext_llama_to_hf.py:halves --config.input.path=IN \
      --config.output.path=OUT --config.output.hf_config.rope_theta=500000

The input is a training step (`items` with Adam state and rng keys) or a params-only checkpoint,
Linen `params/params/...` or NNX `.../value`, scanned or not: the tree says which, and the sizes.
The argument is `ROTARY[,DTYPE]`: the rotary layout the MaxText model rotates, `interleaved` (LLaMARotaryEmbedding:
`llama3.1-*` model names or a `rope_type`; the default, as MaxText's own exporter always assumes)
or `halves` (RotaryEmbedding: llama2, llama3, llama3.3, mistral, `default`), and the tensors'
dtype (default float32; `bfloat16` halves the files). config.json gets what
the shapes tell; `output.hf_config.<field>` sets what they cannot (`rope_theta`,
`max_position_embeddings`, `bos_token_id`, `eos_token_id`, `rms_norm_eps`). Add tokenizer files
with `output.extra_files` (a config.json there is written instead of the one made here).
"""

import ml_collections

from surgery_job.config import get_default_config
from surgery_job.families import llama


def get_config(arg: str = 'interleaved'):
  rotary, _, dtype = arg.partition(',')
  config = get_default_config()
  config.transforms = [dict(op='llama_to_hf', rotary=rotary, dtype=dtype or 'float32')]
  config.output.format = 'safetensors'
  # What config.json says beyond the shapes; each can be set from the command line.
  rope = llama.ROPE_DEFAULTS.get(rotary, llama.ROPE_DEFAULTS['interleaved'])
  config.output.hf_config = ml_collections.ConfigDict({
      'rope_theta': rope['rope_parameters']['rope_theta'],
      'max_position_embeddings': rope['max_position_embeddings'],
      'rms_norm_eps': llama.MAXTEXT_RMS_NORM_EPS,
      'bos_token_id': 1,  # transformers' LlamaConfig defaults; Llama 3's are 128000 and 128001.
      'eos_token_id': 2,
  })
  return config
