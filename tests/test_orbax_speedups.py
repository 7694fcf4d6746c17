"""The one-pass replacements of Orbax's partial-save helpers keep what Orbax's own keep."""

import copy

import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler
from orbax.checkpoint._src.serialization.async_io_engine import BatchRequest

from surgery_job import orbax_speedups
from surgery_job.formats import orbax  # noqa: F401  # Its writer installs them.


def request(handler, keys):
  return BatchRequest(handler, list(keys), [f'v{k}' for k in keys], [f'i{k}' for k in keys],
                      [f'a{k}' for k in keys])


def test_installed_on_the_orbax_they_were_written_for():
  installed = base_pytree_checkpoint_handler._filter_batch_requests  # pylint: disable=protected-access
  assert (installed is orbax_speedups.filter_batch_requests) == (
      ocp.__version__ == orbax_speedups.VERSION)


def test_partial_save_filter_keeps_what_orbax_keeps():
  requests = [request('arrays', [('params', 'a'), ('params', 'b', 'w'), ('step',)]),
              request('scalars', [('count',)])]
  for additions in ({('params', 'a'), ('params', 'b'), ('step',)}, {('params', 'b', 'w'), ('count',)},
                    {('params',)}, {('other',)}):
    want = orbax_speedups.ORBAX_FILTER_BATCH_REQUESTS(requests, additions)
    assert orbax_speedups.filter_batch_requests(requests, additions) == want, additions
  assert orbax_speedups.filter_batch_requests(requests, {('params', 'b', 'w'), ('count',)}) == [
      request('arrays', [('params', 'b', 'w')]), request('scalars', [('count',)])]


def test_merged_metadata_drops_what_orbax_drops():
  for merged in ({"('params', 'a')": 1, "('params', 'a', 'w')": 2, "('params', 'b')": 3, "('step',)": 4},
                 {'a': 1, 'a.b': 2}):
    want = orbax_speedups.ORBAX_FILTER_CONFLICTING_KEYS(copy.deepcopy(merged))
    assert orbax_speedups.filter_conflicting_keys(copy.deepcopy(merged)) == want, merged
  assert orbax_speedups.filter_conflicting_keys({"('params', 'a')": 1, "('params', 'a', 'w')": 2}) == {
      "('params', 'a', 'w')": 2}
