"""Each group's jitted transform, compiled once, ahead of the data.

What XLA's program holds besides its arguments and results (its temporaries: a sort's or a
cumulative sum's scratch, the copies a reshard makes) is host memory on CPU devices, one block per
device, and counts against the budget like the arrays do. The planner asks for it when it cuts
groups (`temp_bytes`), and the job runs the very executable it measured (`run`; a group with
sub-byte inputs goes through jit, see there).
"""

import jax

from surgery_job import plan as plan_lib


class Programs:
  """The compiled transforms of `plan`'s groups, by their outputs."""

  def __init__(self, plan: plan_lib.Plan):
    self.plan = plan
    self.compiled: dict[tuple[str, ...], jax.stages.Compiled | None] = {}
    devices = plan.mesh.local_devices
    # On an accelerator the temporaries live in its memory, not the host's.
    self.host_devices = len(devices) if devices and devices[0].platform == 'cpu' else 0

  def get(self, group: plan_lib.Group) -> jax.stages.Compiled | None:
    """`group`'s transform (`plan.transform_fn`), compiled the first time it is asked for."""
    if group.outputs not in self.compiled:
      transform = plan_lib.transform_fn(self.plan, group)
      self.compiled[group.outputs] = None if transform is None else transform.lower(
          {k: self.plan.inputs[k] for k in group.inputs}).compile()
    return self.compiled[group.outputs]

  def run(self, group: plan_lib.Group, values: dict[str, jax.Array]) -> tuple[dict, dict]:
    """(computed outputs, cast statistics) of `group` on its restored inputs. Orbax restores
    sub-byte leaves (int4) unpacked, where the compiled program takes them packed: jit repacks
    them, so such a group runs through it (compiling again, once)."""
    compiled = self.get(group)
    if compiled is None:
      return {}, {}
    if any(_sub_byte(self.plan.inputs[k].dtype) for k in group.inputs):
      return plan_lib.transform_fn(self.plan, group)(values)
    return compiled(values)

  def temp_bytes(self, group: plan_lib.Group) -> int:
    """Per host: the temporaries of `group`'s program."""
    compiled = self.get(group)
    if compiled is None or not self.host_devices:
      return 0
    analysis = compiled.memory_analysis()
    return 0 if analysis is None else analysis.temp_size_in_bytes * self.host_devices

  def keep_only(self, groups: list[plan_lib.Group]) -> None:
    """Drops the programs of groups the planner cut again."""
    wanted = {group.outputs for group in groups}
    self.compiled = {k: v for k, v in self.compiled.items() if k in wanted}


def _sub_byte(dtype) -> bool:
  return not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) and jax.dtypes.itemsize_bits(dtype) < 8
