"""The Llama family between MaxText and Hugging Face, in process: the reference forward of the
MaxText layout against transformers' logits, the family's transforms against HF.md's formulas bit
for bit, their result loaded into transformers, and every bad input the issue lists."""

import numpy as np
import pytest

import llama_reference as ref

TOLERANCE = 1e-4


@pytest.fixture(scope='session')
def hf():
  """The tiny model, its tensors under the job's keys, and its logits on ref.TOKENS."""
  model = ref.hf_model()
  return model, ref.hf_tensors(model), ref.hf_logits(model)


@pytest.mark.parametrize('scanned', [True, False], ids=['scanned', 'unscanned'])
@pytest.mark.parametrize('rotary', ['interleaved', 'halves'])
def test_reference_forward_of_the_imported_tensors_equals_transformers(hf, rotary, scanned):
  _, tensors, logits = hf
  params = ref.hf_to_maxtext(tensors, rotary, scanned)
  np.testing.assert_allclose(ref.maxtext_logits(params, rotary), logits, rtol=0, atol=TOLERANCE)
  back = ref.maxtext_to_hf(params, rotary)
  assert back.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def _query_unscaled(params):
  q = params['decoder/layers/self_attention/query/kernel']
  return {**params, 'decoder/layers/self_attention/query/kernel': q * np.float32(np.sqrt(ref.HEAD_DIM))}


def _o_proj_transposed_wrongly(hf_tensors):
  # (E, Nq*D) is square here, so reading it untransposed fits every shape.
  return {k: v.T if k.endswith('o_proj/weight') else v for k, v in hf_tensors.items()}


@pytest.mark.parametrize('mistake', ['rotary not converted', 'query not scaled', 'o_proj transposed wrongly'])
def test_a_wrong_mapping_moves_the_logits_far_beyond_the_tolerance(hf, mistake):
  _, tensors, logits = hf
  if mistake == 'rotary not converted':
    params, rotary = ref.hf_to_maxtext(tensors, 'halves', True), 'interleaved'
  elif mistake == 'query not scaled':
    params, rotary = _query_unscaled(ref.hf_to_maxtext(tensors, 'halves', True)), 'halves'
  else:
    params, rotary = ref.hf_to_maxtext(_o_proj_transposed_wrongly(tensors), 'halves', True), 'halves'
  assert np.abs(ref.maxtext_logits(params, rotary) - logits).max() > 100 * TOLERANCE
