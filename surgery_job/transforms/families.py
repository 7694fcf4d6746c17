"""Ops that carry a whole model family's checkpoint between layouts, their sizes read from the tree.

A config cannot know the sizes (heads, head_dim, layers) before the job reads the input, and an HF
folder's head counts are only in its config.json. These ops see the whole tree's shapes when they
run (the plan traces them on abstract values), find the sizes with `families.llama`, and apply the
family's list of plain ops. The export sets the output's config.json; the import checks the input's.
"""

from surgery_job import transforms
from surgery_job.errors import SurgeryError
from surgery_job.families import llama
from surgery_job.transforms.core import Op, State, full_shapes, parse_dtype
from surgery_job.transforms.heads import ROTARY_LAYOUTS


def _check(rotary: str, dtype: str) -> None:
  if rotary not in ROTARY_LAYOUTS:
    raise SurgeryError(f"rotary must be one of {', '.join(map(repr, ROTARY_LAYOUTS))}, got {rotary!r}")
  parse_dtype(dtype)


def _sizes(sizes) -> str:
  """The sizes of a `llama.Sizes`, for notes."""
  return (f'vocab {sizes.vocab}, hidden {sizes.embed}, {sizes.layers} layers, {sizes.q_heads} query '
          f'heads, {sizes.kv_heads} kv heads, head_dim {sizes.head_dim}, mlp {sizes.mlp}')


def _query_scale(head_dim: int, factor: str) -> str:
  if llama.exact_in_binary(head_dim):
    return f'query x {factor}({head_dim}), exact in binary'
  return (f'query x {factor}({head_dim}), not exact in binary: sqrt({head_dim}) is not a power of '
          'two, so a round trip changes low bits')


def llama_to_hf(rotary: str = 'interleaved', dtype: str = 'float32', prefix: str = '') -> Op:
  """A MaxText Llama checkpoint (Linen or NNX, scanned or not, found under `prefix`) to Hugging
  Face's tensors and config.json; `rotary`: the layout MaxText's RoPE rotates ('interleaved' for
  LLaMARotaryEmbedding, as MaxText's exporter assumes; 'halves' for RotaryEmbedding)."""
  _check(rotary, dtype)

  def apply(state: State) -> State:
    sizes = llama.maxtext_sizes(full_shapes(state), prefix)
    out = transforms.apply(transforms.build(llama.to_hf_transforms(sizes, rotary, dtype)), state)
    tree = sizes.tree
    note = (f'llama_to_hf: MaxText Llama ({"NNX" if tree.suffix else "Linen"}, '
            f'{"scanned" if tree.scanned else "unscanned"}): {_sizes(sizes)}; rotary {rotary}'
            f'{" -> halves" if rotary == "interleaved" else ""}; '
            f'{_query_scale(sizes.head_dim, "sqrt")}; writes config.json')
    return out.replace(model_config=llama.hf_config_json(sizes, rotary, dtype=dtype),
                       notes=out.notes + (note,))
  return apply


def llama_from_hf(rotary: str = 'interleaved', scanned: bool = True, dtype: str = 'bfloat16') -> Op:
  """A Hugging Face Llama folder's tensors, checked against its config.json, to MaxText's Linen
  params as its `to_maxtext` writes them (`params/params/...` and `step`), layers stacked on axis 1
  when `scanned`; `rotary`: the layout the MaxText model's RoPE rotates."""
  _check(rotary, dtype)

  def apply(state: State) -> State:
    if state.model_config is None:
      raise SurgeryError('the input has no config.json, which holds the head counts: llama_from_hf '
                         'reads a Hugging Face folder (config.json beside the safetensors)')
    sizes = llama.hf_sizes(state.model_config, full_shapes(state))
    ops = llama.from_hf_transforms(sizes, rotary, scanned, dtype)
    out = transforms.apply(transforms.build(ops), state)
    note = (f'llama_from_hf: Hugging Face Llama, config.json agrees with the tensors: {_sizes(sizes)}'
            f'{" (tied embedding: lm_head from it)" if sizes.tied_embedding else ""}; rotary '
            f'{"halves -> interleaved" if rotary == "interleaved" else "halves"}; '
            f'{_query_scale(sizes.head_dim, "1/sqrt")}; '
            f'{"scanned" if scanned else "unscanned"} Linen layout, {dtype}')
    return out.replace(model_config=None, notes=out.notes + (note,))
  return apply
