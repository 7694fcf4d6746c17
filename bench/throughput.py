"""Wall time, read throughput and peak RSS of the job next to a naive script and `cp -r`.

  .venv/bin/python bench/throughput.py [--dir=/tmp/surgery_throughput] [--gib=1] [--runs=3]
                                       [--leaves=100,1000,10000] [--moments=trained]
                                       [--safetensors_gib=1] [--safetensors_budget_gb=0.1]
                                       [--safetensors_only] [--llama_gib=1] [--llama_only]
                                       [--merge_gib=GIB] [--merge_budget_gb=0.25] [--only_merge]
                                       [--main_only]

Builds a float32 checkpoint of `--gib` GiB: params (4 large matrices, many small ones) and their
optax Adam state (after one step from random gradients, or `--moments=zeros` as `init` leaves it,
which zstd packs to a third), sharded over a ('data', 'model') 2x4 mesh of 8 fake CPU devices.
Then times, interleaved, the median of `--runs` runs of:
  (a) naive: the Flax guide's script: restore everything with its saved shardings, rename every
      param in the flat dict (and its moments), save everything; no validation;
  (b) the job, renaming every param (every leaf passed through, sharded ones copied as their
      stored chunks; validated), and (b0) the same with `output.copy_stored_chunks=False` (every
      leaf decoded and encoded again);
  (a1) naive serving export: restore everything, drop the optimizer state, cast the params to
      bfloat16, save; (c) the job, `configs/params_only_bf16.py`;
  (a2) naive params-only export: restore everything, save the params; (c0) the job, the same
      without cast (`drop_optimizer`);
  (d) `cp -r` + `sync` of the checkpoint: the disk's practical limit; (d0) the same of the params
      (c0) keeps (its output);
  (s) the job renaming a tiny checkpoint: its fixed start-up;
each with its peak RSS, then the ratios the targets use (docs/performance.md).
`--main_only` stops after that table.
A safetensors table times the export of a checkpoint of `--safetensors_gib` GiB of float32 params
(4 matrices sharded over the 2x4 mesh, and a step):
  (e) naive: restore everything, `np.asarray` every param, `safetensors.numpy.save_file`;
  (f) the job, `configs/export_safetensors.py` (validated), with the default budget and with
      `--safetensors_budget_gb`, its peak RSS next to that budget.
`--safetensors_only` runs that table alone.
A Llama table exports a MaxText Llama checkpoint of `--llama_gib` GiB (Linen params, scanned, the
layers and sizes of a small Llama with grouped-query attention) to a Hugging Face folder:
  (g) naive: restore everything, numpy per tensor (HF.md's formulas), `safetensors.numpy.save_file`;
  (h) the job, `configs/maxtext_llama_to_hf.py` (validated), with the default budget and with
      `--safetensors_budget_gb`.
`--llama_only` runs that table alone. A second table times (b) on checkpoints of the same size cut into `--leaves` leaves. A third runs
(b) with no `memory.host_budget_gb` under a faked cgroup limit of `--cgroup_gb` GB, so that the
default budget it picks cuts the checkpoint into groups, and compares its peak RSS with 1.5x that
budget plus the runtime's fixed cost (the peak RSS of the job on a tiny checkpoint).
A merge table averages 4 steps of `--merge_gib` GiB of params each (default `--gib`):
  (i) naive: restore all four steps with their saved shardings, average, save;
  (j) the job, `configs/average_last_n.py:4`, with the default budget and with `--merge_budget_gb`.
`--only_merge` runs that table alone.
"""

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from common import ENV, GIB, commit, load_average, measure
from surgery_job import memory, report
from surgery_job.errors import SurgeryError

REPO = Path(__file__).resolve().parent.parent

BUILD = textwrap.dedent('''
    import math, sys
    import jax, jax.numpy as jnp, numpy as np, optax, orbax.checkpoint as ocp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    path, gib, leaves, moments = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    # Params are a third of the checkpoint (Adam keeps two moments); leaves counts all three.
    params_bytes, count = gib * 2**30 / 3, max(1, leaves // 3)
    big = min(4, count)
    rows = lambda nbytes: max(8, int(nbytes / 4 / 1024) // 8 * 8)
    shapes = {f'big_{i}': (rows(params_bytes / 2 / big), 1024) for i in range(big)}
    shapes.update({f'small_{i}': (rows(params_bytes / 2 / max(1, count - big)), 1024)
                   for i in range(count - big)})
    sharding = NamedSharding(mesh, P('data', 'model'))
    # From numpy, leaf by leaf: one jitted program making 10,000 leaves takes minutes to compile.
    rng = np.random.default_rng(0)
    params = {k: {'kernel': jax.device_put(rng.standard_normal(s, np.float32), sharding)}
              for k, s in sorted(shapes.items())}
    adam = optax.adam(1e-3)
    opt_state = adam.init(params)
    if moments == 'trained':  # One Adam step from random gradients: moments as a trainer saves them.
      grads = jax.tree.map(
          lambda p: jax.device_put(rng.standard_normal(p.shape, np.float32), sharding), params)
      opt_state = adam.update(grads, opt_state, params)[1]
    state = {'params': params, 'opt_state': opt_state, 'step': jnp.asarray(1)}
    with ocp.CheckpointManager(path) as manager:
      manager.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
      manager.wait_until_finished()
    print(3 * len(shapes) + 2, sum(math.prod(s) * 4 for s in shapes.values()) * 3)
''')

# The naive script of the Flax surgery guide, with Orbax: everything restored with its saved
# shardings, changed in memory, saved; no validation. Each naive script below ends it.
NAIVE_RESTORE_ALL = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp
    from flax import traverse_util
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import numpy as np
    source, target = sys.argv[1], sys.argv[2]
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    metadata = ocp.StandardCheckpointer().metadata(f'{source}/1/default').item_metadata.tree
    with ocp.CheckpointManager(source, item_names=('default',)) as manager:
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(
          mesh, P(*getattr(m.sharding, 'partition_spec', ())))), metadata)
      state = manager.restore(1, args=ocp.args.Composite(default=ocp.args.StandardRestore(abstract)))['default']
    def save(tree):
      with ocp.CheckpointManager(target) as manager:
        manager.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave(tree)))
        manager.wait_until_finished()
''')

NAIVE = NAIVE_RESTORE_ALL + textwrap.dedent('''
    flat = traverse_util.flatten_dict(state, sep='/')
    save(traverse_util.unflatten_dict({k.replace('/kernel', '/w'): v for k, v in flat.items()}, sep='/'))
''')

# The serving export as a script: the optimizer state dropped, the params cast to bfloat16.
NAIVE_SERVING = NAIVE_RESTORE_ALL + textwrap.dedent('''
    save({'params': jax.tree.map(lambda x: x.astype(jnp.bfloat16), state['params']), 'step': state['step']})
''')

NAIVE_PARAMS_ONLY = NAIVE_RESTORE_ALL + textwrap.dedent('''
    save({'params': state['params'], 'step': state['step']})
''')

# The usual export script: everything gathered on one host, then one save_file.
NAIVE_SAFETENSORS = textwrap.dedent('''
    import os, sys
    import numpy as np, orbax.checkpoint as ocp
    from flax import traverse_util
    from safetensors.numpy import save_file
    source, target = sys.argv[1], sys.argv[2]
    with ocp.CheckpointManager(source, item_names=('default',)) as manager:
      state = manager.restore(1, args=ocp.args.Composite(default=ocp.args.StandardRestore()))['default']
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state['params'], sep='.').items()}
    os.makedirs(target)
    save_file(flat, f'{target}/model.safetensors', metadata={'format': 'pt'})
''')

# A MaxText Llama (Linen, scanned: layers on axis 1) of about `gib` GiB of float32 params, each
# leaf's first axis sharded over the 8 devices where it divides.
BUILD_LLAMA = textwrap.dedent('''
    import sys
    import jax, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    path, gib = sys.argv[1], float(sys.argv[2])
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    e, nq, nkv, d, f, v = (1024, 16, 8, 64, 2816, 32000) if gib >= 0.25 else (64, 4, 2, 16, 128, 256)
    per_layer = 2 * e * nq * d + 2 * e * nkv * d + 3 * e * f + 2 * e
    layers = max(1, round((gib * 2**30 / 4 - 2 * v * e - e) / per_layer))
    shapes = {'token_embedder/embedding': (v, e), 'decoder/decoder_norm/scale': (e,),
              'decoder/logits_dense/kernel': (e, v)}
    layer = {'pre_self_attention_layer_norm/scale': (e, layers), 'post_self_attention_layer_norm/scale': (e, layers),
             'self_attention/query/kernel': (e, layers, nq, d), 'self_attention/key/kernel': (e, layers, nkv, d),
             'self_attention/value/kernel': (e, layers, nkv, d), 'self_attention/out/kernel': (nq, layers, d, e),
             'mlp/wi_0/kernel': (e, layers, f), 'mlp/wi_1/kernel': (e, layers, f), 'mlp/wo/kernel': (f, layers, e)}
    shapes.update({f'decoder/layers/{k}': s for k, s in layer.items()})
    rng = np.random.default_rng(0)
    params = {}
    for key, shape in shapes.items():
      spec = P(('data', 'model')) if shape[0] % 8 == 0 else P()
      value = jax.device_put(rng.standard_normal(shape, np.float32) / 16, NamedSharding(mesh, spec))
      node = params
      for part in key.split('/')[:-1]:
        node = node.setdefault(part, {})
      node[key.split('/')[-1]] = value
    with ocp.CheckpointManager(path) as manager:
      manager.save(1, args=ocp.args.Composite(items=ocp.args.StandardSave(
          {'params': {'params': params}, 'step': np.asarray(1, np.int32)})),
          custom_metadata={'scan_layers': True})
      manager.wait_until_finished()
    print(layers, sum(np.prod(s) * 4 for s in shapes.values()))
''')

# MaxText's exporter: every param restored on one host, HF.md's numpy formulas, one save_file.
NAIVE_LLAMA = textwrap.dedent('''
    import json, os, sys
    import numpy as np, orbax.checkpoint as ocp
    from flax import traverse_util
    from safetensors.numpy import save_file
    source, target = sys.argv[1], sys.argv[2]
    with ocp.CheckpointManager(source, item_names=('items',)) as manager:
      state = manager.restore(1, args=ocp.args.Composite(items=ocp.args.StandardRestore()))['items']
    p = {k: np.asarray(x) for k, x in traverse_util.flatten_dict(state['params']['params'], sep='/').items()}
    e, d = p['token_embedder/embedding'].shape[1], p['decoder/layers/self_attention/query/kernel'].shape[-1]
    halves = lambda x: np.concatenate([x[..., 0::2], x[..., 1::2]], -1)
    out = {'model.embed_tokens.weight': p['token_embedder/embedding'], 'model.norm.weight': p['decoder/decoder_norm/scale'],
           'lm_head.weight': p['decoder/logits_dense/kernel'].T}
    names = {'pre_self_attention_layer_norm/scale': 'input_layernorm', 'post_self_attention_layer_norm/scale':
             'post_attention_layernorm', 'mlp/wi_0/kernel': 'mlp.gate_proj', 'mlp/wi_1/kernel': 'mlp.up_proj',
             'mlp/wo/kernel': 'mlp.down_proj'}
    for i in range(p['decoder/layers/self_attention/query/kernel'].shape[1]):
      layer = {k[len('decoder/layers/'):]: x[:, i] for k, x in p.items() if k.startswith('decoder/layers/')}
      hf = {f'{n}.weight': layer[k].T for k, n in names.items()}
      hf['self_attn.q_proj.weight'] = halves(layer['self_attention/query/kernel'] * np.float32(np.sqrt(d))).reshape(e, -1).T
      hf['self_attn.k_proj.weight'] = halves(layer['self_attention/key/kernel']).reshape(e, -1).T
      hf['self_attn.v_proj.weight'] = layer['self_attention/value/kernel'].reshape(e, -1).T
      hf['self_attn.o_proj.weight'] = layer['self_attention/out/kernel'].reshape(-1, e).T
      out.update({f'model.layers.{i}.{n}': x for n, x in hf.items()})
    os.makedirs(target)
    save_file({k: np.ascontiguousarray(x) for k, x in out.items()}, f'{target}/model.safetensors',
              metadata={'format': 'pt'})
''')

# Steps 1..STEPS of one run: params only, 4 float32 matrices, GIB GiB a step, other values each step.
BUILD_STEPS = textwrap.dedent('''
    import sys
    import jax, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    path, gib, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P('data', 'model'))
    rows = max(8, int(gib * 2**30 / 4 / 4 / 1024) // 8 * 8)
    with ocp.CheckpointManager(path) as manager:
      for step in range(1, steps + 1):
        rng = np.random.default_rng(step)
        params = {f'w_{i}': jax.device_put(rng.standard_normal((rows, 1024), np.float32), sharding)
                  for i in range(4)}
        manager.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(
            {'params': params, 'step': np.asarray(step, np.int32)})))
        manager.wait_until_finished()
    print(4 * rows * 1024 * 4)
''')

# Averaging the steps as a script does: every step restored at once, averaged, saved.
NAIVE_AVERAGE = textwrap.dedent('''
    import sys
    import jax, orbax.checkpoint as ocp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import numpy as np
    source, target = sys.argv[1], sys.argv[2]
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    with ocp.CheckpointManager(source, item_names=('default',)) as manager:
      steps = manager.all_steps()[-4:]
      metadata = ocp.StandardCheckpointer().metadata(f'{source}/{steps[-1]}/default').item_metadata.tree
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(
          mesh, P(*getattr(m.sharding, 'partition_spec', ())))), metadata)
      states = [manager.restore(s, args=ocp.args.Composite(default=ocp.args.StandardRestore(abstract)))['default']
                for s in steps]
    params = jax.tree.map(lambda *xs: sum(xs) / len(xs), *[s['params'] for s in states])
    with ocp.CheckpointManager(target) as manager:
      manager.save(steps[-1], args=ocp.args.Composite(default=ocp.args.StandardSave(
          {'params': params, 'step': states[-1]['step']})))
      manager.wait_until_finished()
''')

PARAMS_ONLY = textwrap.dedent('''
    import ml_collections
    def get_config():
      return ml_collections.ConfigDict({'transforms': [dict(op='drop_optimizer')]})
''')

RENAME = textwrap.dedent('''
    import ml_collections
    def get_config():
      return ml_collections.ConfigDict({'transforms': [
          dict(op='rename', pattern=r'(.*)/kernel', replacement=r'\\1/w')]})
''')


MAIN_ROWS = {
    'a': 'naive rename: restore all, rename, save',
    'b': 'job, rename',
    'b0': 'job, rename, decoded and encoded',
    'a1': 'naive serving export: restore all, params to bf16, save',
    'c': 'job, params_only_bf16',
    'a2': 'naive params only: restore all, save the params',
    'c0': 'job, params only, no cast',
    'd': 'cp -r + sync',
    'd0': 'cp -r + sync of the params (c0) keeps',
    's': 'job, rename, a checkpoint of 0.001 GiB: start-up',
}


def write_scripts(root: Path) -> dict[str, str]:
  """{name: path} of the configs and naive scripts the tables run, written in `root`."""
  scripts = {'rename': RENAME, 'params_only': PARAMS_ONLY, 'naive': NAIVE,
             'naive_serving': NAIVE_SERVING, 'naive_params_only': NAIVE_PARAMS_ONLY}
  for name, text in scripts.items():
    (root / f'{name}.py').write_text(text)
  return {name: str(root / f'{name}.py') for name in scripts}


def build(path: Path, gib: float, leaves: int, moments: str = 'trained') -> tuple[int, int]:
  out = subprocess.run([sys.executable, '-c', BUILD, str(path), str(gib), str(leaves), moments],
                       env=ENV, capture_output=True, text=True, check=True).stdout.split()
  return int(out[0]), int(out[1])


def build_steps(path: Path, gib: float, steps: int) -> int:
  """Steps 1..`steps` of params only, `gib` GiB each; returns a step's bytes."""
  return int(subprocess.run([sys.executable, '-c', BUILD_STEPS, str(path), str(gib), str(steps)],
                            env=ENV, capture_output=True, text=True, check=True).stdout)


def job(config: str, source: Path, target: Path) -> list[str]:
  return [sys.executable, '-m', 'surgery_job', f'--config={config}', f'--config.input.path={source}',
          f'--config.output.path={target}']


def copy_and_sync(source: Path, target: Path) -> list[str]:
  return ['sh', '-c', f'cp -r "{source}" "{target}" && sync']


def median_runs(commands: dict[str, list[str]], out: Path, runs: int,
                env: dict[str, str] | None = None) -> dict[str, dict]:
  """Each command `runs` times, interleaved; the median wall time's run, with its phases and
  groups."""
  results = {name: [] for name in commands}
  for _ in range(runs):
    for name, command in commands.items():
      shutil.rmtree(out, ignore_errors=True)
      subprocess.run(['sync'], check=True)
      wall, rss = measure(command, env)
      try:
        found = json.loads(report.find(out).read_text())
      except SurgeryError:  # A naive script writes no report.
        found = {}
      results[name].append({'wall': wall, 'rss': rss, 'phases': found.get('seconds', {}),
                            'groups': len(found.get('groups', []))})
  shutil.rmtree(out, ignore_errors=True)
  return {name: sorted(rows, key=lambda r: r['wall'])[len(rows) // 2] for name, rows in results.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/surgery_throughput')
  parser.add_argument('--gib', type=float, default=1.0)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--leaves', default='100,1000,10000')
  parser.add_argument('--cgroup_gb', type=float, default=1.0)
  parser.add_argument('--safetensors_gib', type=float, default=1.0)
  parser.add_argument('--safetensors_budget_gb', type=float, default=0.1)
  parser.add_argument('--safetensors_only', action='store_true', help='the safetensors table alone')
  parser.add_argument('--moments', choices=('trained', 'zeros'), default='trained',
                      help="Adam's moments after one step, or as `init` leaves them (zstd packs zeros)")
  parser.add_argument('--llama_gib', type=float, default=1.0)
  parser.add_argument('--llama_only', action='store_true', help='the Llama export table alone')
  parser.add_argument('--merge_gib', type=float, default=None, help='each averaged step; default --gib')
  parser.add_argument('--merge_budget_gb', type=float, default=0.25)
  parser.add_argument('--only_merge', action='store_true', help='only the merge table')
  parser.add_argument('--main_only', action='store_true', help='only the first table')
  args = parser.parse_args()
  root = Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  if args.llama_only:
    llama_rows(root, root / 'out', args)
    return
  if args.safetensors_only:
    safetensors_rows(root, root / 'out', args)
    return
  if args.only_merge:
    merge_rows(root, root / 'out', args)
    return
  source, out = root / 'in', root / 'out'
  leaves, size = build(source, args.gib, 30, args.moments)
  print(f'checkpoint: {leaves} leaves, {size / GIB:.2f} GiB (params and Adam state, {args.moments} '
        f'moments), {disk_mib(source):.0f} MiB on disk, 2x4 mesh')
  tiny, kept = root / 'in_tiny', root / 'params_kept'
  build(tiny, 0.001, 30)
  scripts = write_scripts(root)
  subprocess.run(job(scripts['params_only'], source, kept), env=ENV, capture_output=True, check=True)
  report.find(kept).unlink()  # (d0) copies the params, not the job's report.
  commands = {
      'a': [sys.executable, scripts['naive'], str(source), str(out)],
      'b': job(scripts['rename'], source, out),
      'b0': [*job(scripts['rename'], source, out), '--config.output.copy_stored_chunks=False'],
      'a1': [sys.executable, scripts['naive_serving'], str(source), str(out)],
      'c': job(str(REPO / 'configs' / 'params_only_bf16.py'), source, out),
      'a2': [sys.executable, scripts['naive_params_only'], str(source), str(out)],
      'c0': job(scripts['params_only'], source, out),
      'd': copy_and_sync(source, out),
      'd0': copy_and_sync(kept, out),
      's': job(scripts['rename'], tiny, out),
  }
  rows = median_runs(commands, out, args.runs)
  kept_bytes = disk_mib(kept) * 2**20
  print(f'\nmedian of {args.runs}, interleaved; MB/s of the checkpoint ((d0): of what it copies)\n')
  print('| run | wall s | MB/s | peak RSS GiB | phases (s) |')
  print('|---|---|---|---|---|')
  for code, row in rows.items():
    speed = '-' if code == 's' else f"{(kept_bytes if code == 'd0' else size) / 1e6 / row['wall']:.0f}"
    print(f"| ({code}) {MAIN_ROWS[code]} | {row['wall']:.1f} | {speed} | {row['rss']:.2f} | "
          f'{phases(row)} |')
  wall = {code: row['wall'] for code, row in rows.items()}
  print(f"\nb/a = {wall['b'] / wall['a']:.2f}, c/a1 = {wall['c'] / wall['a1']:.2f}, "
        f"c0/a2 = {wall['c0'] / wall['a2']:.2f}, b/b0 = {wall['b'] / wall['b0']:.2f}, "
        f"b/d = {wall['b'] / wall['d']:.2f}, c0/d0 = {wall['c0'] / wall['d0']:.2f}, "
        f"(c0 - s)/d0 = {(wall['c0'] - wall['s']) / wall['d0']:.2f} "
        f'((d0) copies the {kept_bytes / 2**20:.0f} MiB of params (c0) keeps; (s) is the start-up)')
  if args.main_only:
    return

  print('\n| leaves | GiB | wall s | ms per leaf | phases (s) |')
  print('|---|---|---|---|---|')
  for count in (int(n) for n in args.leaves.split(',') if n):
    many = root / f'in_{count}'
    leaves, many_size = build(many, args.gib, count, args.moments)
    row = median_runs({'job': job(str(root / 'rename.py'), many, out)}, out, args.runs)['job']
    print(f"| {leaves} | {many_size / GIB:.2f} | {row['wall']:.1f} | {row['wall'] * 1e3 / leaves:.1f} | "
          f"{phases(row)} |")
    shutil.rmtree(many)

  safetensors_rows(root, out, args)
  llama_rows(root, out, args)
  default_budget(root, source, out, rows['s'], args)
  merge_rows(root, out, args)


def disk_mib(path: Path) -> float:
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20


def phases(row: dict) -> str:
  return ', '.join(f'{k} {v:.1f}' for k, v in row['phases'].items() if v >= 0.05)


def print_groups_table(rows: dict) -> None:
  print('| run | wall s | peak RSS GiB | groups | phases (s) |')
  print('|---|---|---|---|---|')
  for name, row in rows.items():
    print(f"| {name} | {row['wall']:.1f} | {row['rss']:.2f} | {row['groups'] or '-'} | {phases(row)} |")


def safetensors_rows(root: Path, out: Path, args) -> None:
  """(e) and (f): params exported to safetensors, gathered on one host or not."""
  source = root / 'params'
  size = build_steps(source, args.safetensors_gib, 1)
  (root / 'naive_safetensors.py').write_text(NAIVE_SAFETENSORS)
  export = job(str(REPO / 'configs' / 'export_safetensors.py'), source, out)
  budget = args.safetensors_budget_gb
  rows = median_runs({
      '(e) naive: restore all, np.asarray, save_file': [
          sys.executable, str(root / 'naive_safetensors.py'), str(source), str(out)],
      '(f) job, export_safetensors': export,
      f'(f) job, export_safetensors, budget {budget} GB': [
          *export, f'--config.memory.host_budget_gb={budget}'],
  }, out, args.runs)
  print(f'\nsafetensors export of {size / GIB:.2f} GiB of params, median of {args.runs}\n')
  print_groups_table(rows)
  shutil.rmtree(source)


def llama_rows(root: Path, out: Path, args) -> None:
  """(g) and (h): a MaxText Llama exported to Hugging Face, gathered on one host or not."""
  source = root / 'llama'
  built = subprocess.run([sys.executable, '-c', BUILD_LLAMA, str(source), str(args.llama_gib)],
                         env=ENV, capture_output=True, text=True, check=True).stdout.split()
  layers, size = int(built[0]), int(built[1])
  (root / 'naive_llama.py').write_text(NAIVE_LLAMA)
  export = job(f'{REPO / "configs" / "maxtext_llama_to_hf.py"}', source, out)
  budget = args.safetensors_budget_gb
  rows = median_runs({
      '(g) naive: restore all, numpy formulas, save_file': [
          sys.executable, str(root / 'naive_llama.py'), str(source), str(out)],
      '(h) job, maxtext_llama_to_hf': export,
      f'(h) job, maxtext_llama_to_hf, budget {budget} GB': [
          *export, f'--config.memory.host_budget_gb={budget}'],
  }, out, args.runs)
  print(f'\nMaxText Llama ({layers} layers, {size / GIB:.2f} GiB float32) to Hugging Face, median of '
        f'{args.runs}\n')
  print_groups_table(rows)
  shutil.rmtree(source)


def default_budget(root: Path, source: Path, out: Path, fixed: dict, args) -> None:
  """(b) with the budget the job picks under a faked cgroup limit, against 1.5x that budget plus
  the runtime's fixed cost (`fixed`: the run of the job on a tiny checkpoint)."""
  cgroup = root / 'cgroup'
  cgroup.mkdir()
  (cgroup / 'memory.max').write_text(f'{int(args.cgroup_gb * 1e9)}\n')
  (cgroup / 'memory.current').write_text('0\n')
  memory.CGROUP_ROOT = cgroup
  budget, how = memory.default_budget(1)
  row = median_runs({'job': job(str(root / 'rename.py'), source, out)}, out, args.runs,
                    {'SURGERY_JOB_CGROUP_ROOT': str(cgroup)})['job']
  bound = 1.5 * budget / GIB + fixed['rss']
  print(f'\ndefault budget: {budget / 1e9:.2f} GB ({how})\n')
  print('| run | groups | wall s | peak RSS GiB | 1.5 x budget + fixed cost, GiB |')
  print('|---|---|---|---|---|')
  print(f"| (b) job, rename, default budget | {row['groups']} | {row['wall']:.1f} | {row['rss']:.2f} | "
        f"{1.5 * budget / GIB:.2f} + {fixed['rss']:.2f} = {bound:.2f} |")


def merge_rows(root: Path, out: Path, args) -> None:
  """(i) and (j): the last 4 steps of a run averaged, all restored at once or group by group."""
  steps = root / 'steps'
  size = build_steps(steps, args.merge_gib or args.gib, 4)
  (root / 'naive_average.py').write_text(NAIVE_AVERAGE)
  average = job(f'{REPO / "configs" / "average_last_n.py"}:4', steps, out)
  budget = args.merge_budget_gb
  rows = median_runs({
      '(i) naive: restore all 4, average, save': [
          sys.executable, str(root / 'naive_average.py'), str(steps), str(out)],
      '(j) job, average_last_n:4': average,
      f'(j) job, average_last_n:4, budget {budget} GB': [*average, f'--config.memory.host_budget_gb={budget}'],
  }, out, args.runs)
  print(f'\naveraging 4 steps of {size / GIB:.2f} GiB each, median of {args.runs}\n')
  print_groups_table(rows)
  shutil.rmtree(steps)


if __name__ == '__main__':
  start = time.perf_counter()
  print(f'commit {commit()}, load average {load_average()}')
  main()
  print(f'\n(benchmark took {time.perf_counter() - start:.0f} s; load average {load_average()} at the end)')
