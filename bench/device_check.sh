#!/usr/bin/env bash
# The job on a real accelerator: the example CNN checkpoint, three surgeries (one streamed under a
# memory budget), each output restored with plain Orbax and checked against the input.
#   bash bench/device_check.sh [WORKDIR]
set -euo pipefail
work=${1:-/tmp/surgery_device_check}
rm -rf "$work" && mkdir -p "$work"
py=${PYTHON:-python3}
$py -c 'import jax; print("devices:", jax.devices())'
$py -m surgery_job.example --path="$work/cnn"
cat > "$work/head.py" <<'PY'
import ml_collections
def get_config():
  return ml_collections.ConfigDict({'transforms': [
      dict(op='pad', pattern='Dense_1/(kernel|bias)', axis=-1, size=16, init='zeros'),
      dict(op='rename', pattern='Dense_1/(.*)', replacement=r'head/\1'),
      dict(op='cast', pattern='Conv_.*', dtype='bfloat16')]})
PY
run() { local name=$1; shift; local start=$SECONDS
  $py -m surgery_job "$@" --config.input.path="$work/cnn" --config.output.path="$work/$name" 2>"$work/$name.log" \
    || { tail -20 "$work/$name.log"; exit 1; }
  echo "$name: ok in $((SECONDS - start)) s"; }
run identity --config=configs/identity.py
run serving --config=configs/params_only_bf16.py
run head --config="$work/head.py"
run head_streamed --config="$work/head.py" --config.memory.host_budget_gb=0.001
$py - "$work" <<'PY'
import sys, numpy as np, jax, orbax.checkpoint as ocp
work = sys.argv[1]
def load(name):
  tree = ocp.StandardCheckpointer().metadata(f'{work}/{name}/1/default').item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  leaves = jax.tree_util.tree_flatten_with_path(ocp.StandardCheckpointer().restore(f'{work}/{name}/1/default', target))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x) for p, x in leaves}
cnn, identity, serving = load('cnn'), load('identity'), load('serving')
assert all(np.array_equal(cnn[k], identity[k]) for k in cnn) and sorted(cnn) == sorted(identity)
assert sorted(serving) == sorted(k for k in cnn if k.startswith('params/') or k == 'step')
assert all(serving[k].dtype.name == 'bfloat16' for k in serving if k.startswith('params/'))
head, streamed = load('head'), load('head_streamed')
assert sorted(head) == sorted(streamed) and all(head[k].tobytes() == streamed[k].tobytes() for k in head)
np.testing.assert_array_equal(head['params/head/kernel'][:, :10], cnn['params/Dense_1/kernel'])
assert not head['opt_state/0/mu/head/kernel'][:, 10:].any()
print('device check: all outputs restored and checked on', jax.devices()[0].device_kind)
PY
