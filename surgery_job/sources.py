"""An input in either format the job reads, an Orbax checkpoint or a legacy Flax msgpack file:
found, its leaves laid on a mesh, and read group by group. The job and `surgery-job-diff` both read
through here, so they take the same inputs."""

from typing import Any

import jax
from jax.sharding import Mesh

from surgery_job import checkpoint, keys, plan as plan_lib, tree
from surgery_job.formats import flax_msgpack as legacy_flax


def reader_of(path: str, input_format: str | None):
  """The module that finds and reads the input at `path` (`locate`, `read_metadata`,
  `select_steps`): `legacy_flax` for a msgpack input, else `checkpoint`."""
  return legacy_flax if legacy_flax.is_msgpack(path, input_format) else checkpoint


def read_metadata(source: checkpoint.Location) -> Any:
  """The tree of `source`'s leaves, each a ShapeDtypeStruct or Orbax's metadata of it."""
  if isinstance(source, legacy_flax.Source):
    return legacy_flax.read_metadata(source)
  return checkpoint.read_metadata(source)


def abstract_inputs(source: checkpoint.Location, metadata: dict[str, Any], layout: tree.Layout,
                    mesh: Mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """{key: the leaf as it is read onto `mesh`}: an Orbax leaf with the spec it was saved with,
  fitted to the mesh; a msgpack leaf, which records none, with the spec of `rules`."""
  if isinstance(source, legacy_flax.Source):
    return legacy_flax.abstract_inputs(metadata, layout, mesh, rules)
  impls = checkpoint.joined({
      prefix: keys.implementations(item_dir, part) for (prefix, item_dir), part in zip(
          source.trees().items(), checkpoint.per_tree(source.trees(), metadata).values())})
  return plan_lib.abstract_inputs(metadata, impls, mesh)


def restore(source: checkpoint.Location, skeleton: Any,
            targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The `targets` leaves of `source` (whose tree is `skeleton`), each on its sharding."""
  if isinstance(source, legacy_flax.Source):
    return legacy_flax.restore(source, targets)
  return checkpoint.restore(source.trees(), skeleton, targets)
