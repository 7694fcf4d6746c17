"""`surgery-job-inspect PATH`: the tree of an Orbax checkpoint from its metadata, no array data read.

  surgery-job-inspect CKPT                 # a CheckpointManager dir: its steps, the latest committed one
  surgery-job-inspect CKPT --step 2 --depth 2 --filter 'mlp' --json

For a CheckpointManager directory it lists the steps (committed, and saves in progress: Orbax's
`*.orbax-checkpoint-tmp*` folders and step folders without an item yet), then the chosen step's
items and custom metadata. Each leaf has its shape, dtype, saved PartitionSpec and size; each
subtree its leaf count and bytes; the params root and the optimizer mirrors are those the job finds.
A Flax msgpack checkpoint (`checkpoint_<step>`, or a folder of them) is decoded whole, as the job
reads it: msgpack has no index of shapes, and no shardings. Safetensors (a file, a folder of them,
or a folder of step folders of them) show their tensors from the headers, keyed as the job keys
them (`.` read as `/`); they record no shardings either.
"""

import collections
import json
import re
import sys
from typing import Any

import jax.numpy as jnp
from jax.sharding import PartitionSpec

from surgery_job import checkpoint, cli, formats, paths, saved_leaves, tree
from surgery_job.errors import SurgeryError

PROG = 'surgery-job-inspect'


def list_steps(root: paths.Path) -> list[dict]:
  """Every step folder of a CheckpointManager directory, oldest first, committed or in progress."""
  committed = set(checkpoint.committed_steps(root))
  found = []
  for folder in root.iterdir():
    number = checkpoint.step_of(folder.name)
    if not folder.is_dir() or number is None:
      continue
    if checkpoint.TMP_SUFFIX in folder.name:
      state = 'in progress'
    elif number in committed:
      state = 'committed'
    else:
      state = 'in progress (no item yet)'
    found.append({'step': number, 'folder': folder.name, 'state': state})
  return sorted(found, key=lambda s: (s['step'], s['folder']))


def leaf_entry(leaf: saved_leaves.SavedLeaf) -> dict:
  entry = {'shape': list(leaf.shape), 'dtype': leaf.dtype.name,
           'spec': [list(e) if isinstance(e, tuple) else e for e in leaf.spec],
           'bytes': cli.nbytes(leaf.shape, leaf.dtype)}
  if leaf.prng_impl:
    entry['prng_impl'] = leaf.prng_impl  # Saved as its key data: the shape and dtype above.
  return entry


def subtotals(leaves: dict[str, dict], depth: int | None) -> dict[str, dict]:
  """{subtree key: {'leaves', 'bytes'}} of every subtree (down to `depth` parts), in tree order."""
  totals: dict[str, dict] = {}
  for key, entry in leaves.items():
    parts = key.split(tree.SEP)
    for end in range(1, len(parts) if depth is None else min(len(parts), depth + 1)):
      total = totals.setdefault(tree.SEP.join(parts[:end]), {'leaves': 0, 'bytes': 0})
      total['leaves'] += 1
      total['bytes'] += entry['bytes']
  return totals


def inspect(path: str, step: int | None = None, pattern: str | None = None,
            depth: int | None = None) -> dict:
  """Everything `inspect` shows, as the JSON it prints with `--json`."""
  root = paths.of(path)
  info: dict[str, Any] = {'path': str(root)}
  reader = formats.reader(str(root)) if root.exists() else formats.module('orbax')
  if reader is formats.module('orbax'):
    saved = _orbax_leaves(root, step, info)
  else:
    saved = _unsharded_leaves(root, step, info)
  meshes = collections.Counter(tuple(leaf.mesh.items()) for leaf in saved.values() if leaf.mesh)
  info['saved_mesh'] = dict(meshes.most_common(1)[0][0]) if meshes else None
  try:
    layout = tree.find_layout(list(saved), None)
    info['params_root'], info['optimizer_mirrors'] = layout.params_root, list(layout.mirror_roots)
  except ValueError:
    info['params_root'], info['optimizer_mirrors'] = None, []
  try:
    wanted = re.compile(pattern) if pattern else None
  except re.error as e:
    raise SurgeryError(f'--filter {pattern!r}: {e}') from None
  leaves = {key: leaf_entry(leaf) for key, leaf in saved.items()
            if wanted is None or wanted.search(key)}
  info['subtrees'] = subtotals(leaves, depth)
  info['total'] = {'leaves': len(leaves), 'bytes': sum(e['bytes'] for e in leaves.values())}
  info['leaves'] = {k: e for k, e in leaves.items() if depth is None or k.count(tree.SEP) < depth}
  return info


def _orbax_leaves(root: paths.Path, step: int | None, info: dict) -> dict[str, saved_leaves.SavedLeaf]:
  """The leaves of an Orbax checkpoint; its steps, items and custom metadata go into `info`."""
  if root.is_dir() and not (root / '_METADATA').is_file() and not cli.is_step_folder(root):
    info['steps'] = list_steps(root)
    if not any(s['state'] == 'committed' for s in info['steps']):
      raise SurgeryError(f'{root} holds no committed step (step folders: '
                         f'{[s["folder"] for s in info["steps"]]})')
  _, location = cli.locate(str(root), step)
  step_metadata = checkpoint.step_metadata(location)
  if location.step is not None:
    handlers = step_metadata.get('item_handlers') or {}
    names = [*([location.item] if location.item else location.items), *location.copied]
    info['step'] = location.step
    info['items'] = {name: {'pytree': name not in location.copied,
                            'handler': handlers.get(name) if isinstance(handlers, dict) else None}
                     for name in sorted(names)}
    info['custom_metadata'] = step_metadata.get('custom_metadata') or {}
  return {tree.join(prefix, key): leaf for prefix, item_dir in location.trees().items()
          for key, leaf in saved_leaves.read(item_dir).items()}


def _unsharded_leaves(root: paths.Path, step: int | None,
                      info: dict) -> dict[str, saved_leaves.SavedLeaf]:
  """The leaves of a format that records no shardings: a Flax msgpack checkpoint, decoded whole
  (msgpack has no index to read shapes from), or safetensors, from their headers."""
  reader, source = cli.locate(str(root), step)
  info['format'] = reader.FORMAT
  if source.step is not None:
    info['step'] = source.step
  return {key: saved_leaves.SavedLeaf(tuple(x.shape), jnp.dtype(x.dtype), PartitionSpec(), None, None)
          for key, x in tree.flatten(reader.read_metadata(source)).items()}


def _tree_order(key: str) -> tuple:
  """Parents before children, siblings in natural order (`layers_2` before `layers_10`)."""
  return tuple(tuple(int(c) if i % 2 else c for i, c in enumerate(re.split(r'(\d+)', part)))
               for part in key.split(tree.SEP))


def _count(n: int) -> str:
  return f'{n} leaf' if n == 1 else f'{n} leaves'


def render(info: dict) -> str:
  """The printed tree: steps, items, layout, then one line per subtree and leaf, then the total."""
  lines = []
  if 'steps' in info:
    folders = len(info['steps'])
    lines.append(f"{info['path']}: CheckpointManager directory, {folders} step folder{'s' * (folders != 1)}")
    for s in info['steps']:
      chosen = '  <- shown' if s['folder'] == str(info['step']) else ''
      folder = f" ({s['folder']})" if s['folder'] != str(s['step']) else ''
      lines.append(f"  step {s['step']:<8} {s['state']}{folder}{chosen}")
  elif 'format' in info:
    lines.append(f"{info['path']}: {formats.module(info['format']).TITLE}"
                 + (f", step {info['step']}" if 'step' in info else ''))
  else:
    lines.append(f"{info['path']}" + (f": step {info['step']}" if 'step' in info else
                                        ': single PyTree checkpoint'))
  if 'items' in info:
    lines.append(f"Step {info['step']} items: " + ', '.join(
        f"{name} ({'PyTree' if item['pytree'] else 'copied as is'})" for name, item in info['items'].items()))
    lines.append(f"Custom metadata: {json.dumps(info['custom_metadata'], sort_keys=True)}")
  if info['saved_mesh']:
    lines.append(f"Saved mesh: {info['saved_mesh']}")
  if info['params_root'] is not None:
    lines.append(f"Params root: {info['params_root'] or '(the whole tree)'}; optimizer mirrors: "
                 f"{', '.join(info['optimizer_mirrors']) or 'none'}")
  rows = []
  for key in sorted([*info['subtrees'], *info['leaves']], key=_tree_order):
    name = '  ' * key.count(tree.SEP) + key.rsplit(tree.SEP, 1)[-1]
    if key in info['leaves']:
      entry = info['leaves'][key]
      kind = f"key<{entry['prng_impl']}> data " if 'prng_impl' in entry else ''
      rows.append((name, f"{kind}{tuple(entry['shape'])} {entry['dtype']} "
                         f"{cli.spec_text(entry['spec'])} {cli.human(entry['bytes'])}"))
    else:
      total = info['subtrees'][key]
      rows.append((name + '/', f"{_count(total['leaves'])}, {cli.human(total['bytes'])}"))
  width = min(60, max((len(name) for name, _ in rows), default=0))
  lines += [f'{name:<{width}}  {what}' for name, what in rows]
  total = info['total']
  lines.append(f"Total: {_count(total['leaves'])}, {cli.human(total['bytes'])} ({total['bytes']} bytes)")
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = cli.Parser(prog=PROG, description=__doc__)
  parser.add_argument('path', help='a CheckpointManager directory, one step folder of it, or a '
                      'single PyTree checkpoint')
  parser.add_argument('--step', type=int, help='the step to show (default: the latest committed)')
  parser.add_argument('--filter', help='only leaves whose key matches this regex (re.search)')
  parser.add_argument('--depth', type=int, help='show subtrees down to this many key parts')
  parser.add_argument('--json', action='store_true', help='print JSON instead of the tree')
  args = parser.parse_args(argv)
  if args.depth is not None and args.depth < 1:
    parser.error(f'--depth must be at least 1, got {args.depth}')
  info = inspect(args.path, args.step, args.filter, args.depth)
  print(json.dumps(info, indent=1) if args.json else render(info))
  return 0


def run() -> None:
  """The console script."""
  sys.exit(cli.run(PROG, main))


if __name__ == '__main__':
  run()
