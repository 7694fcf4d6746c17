"""The writer's one-pass filter of a partial save's requests keeps what Orbax's own keeps."""

from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler
from orbax.checkpoint._src.serialization.async_io_engine import BatchRequest

from surgery_job import writer

filter_requests = writer._filter_batch_requests  # pylint: disable=protected-access


def request(handler, keys):
  return BatchRequest(handler, list(keys), [f'v{k}' for k in keys], [f'i{k}' for k in keys],
                      [f'a{k}' for k in keys])


def test_partial_save_filter_keeps_the_values_under_the_additions():
  assert base_pytree_checkpoint_handler._filter_batch_requests is filter_requests  # pylint: disable=protected-access
  requests = [request('arrays', [('params', 'a'), ('params', 'b', 'w'), ('step',)]),
              request('scalars', [('count',)])]
  assert filter_requests(requests, {('params', 'a'), ('params', 'b'), ('step',)}) == [
      request('arrays', [('params', 'a'), ('params', 'b', 'w'), ('step',)])]
  assert filter_requests(requests, {('params', 'b', 'w'), ('count',)}) == [
      request('arrays', [('params', 'b', 'w')]), request('scalars', [('count',)])]


def test_merged_metadata_drops_entries_that_are_parents_of_others():
  merged = {"('params', 'a')": 1, "('params', 'a', 'w')": 2, "('params', 'b')": 3, "('step',)": 4}
  assert writer._filter_conflicting_keys(merged) == {  # pylint: disable=protected-access
      "('params', 'a', 'w')": 2, "('params', 'b')": 3, "('step',)": 4}
  assert writer._filter_conflicting_keys({'a': 1, 'a.b': 2}) == {'a.b': 2}  # pylint: disable=protected-access
