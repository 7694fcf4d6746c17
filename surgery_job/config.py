"""The job's config: every field with its default, and the merge of a user's config onto them."""

import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from surgery_job import inputs as inputs_lib
from surgery_job.errors import SurgeryError


def get_default_config() -> ml_collections.ConfigDict:
  """Every field the job reads, with its default. Config files override what they need."""
  config = ml_collections.ConfigDict()

  config.input = ml_collections.ConfigDict()
  config.input.path = config_dict.placeholder(str)  # CheckpointManager dir or one PyTree checkpoint.
  # A step, a list of steps, None or 'latest' (the latest committed step), 'all' (every committed
  # step) or 'new' (every committed step the output does not have yet).
  config.input.step = config_dict.placeholder(object)
  config.input.item = config_dict.placeholder(str)  # None: every item of the step; a name: that one.
  # 'orbax', 'flax_msgpack' (`checkpoint_<step>` files of flax.training.checkpoints) or
  # 'safetensors'; None: such a file (or one starting with a msgpack map), or a folder of them with
  # no Orbax checkpoint, is msgpack; a `*.safetensors` file, or a folder holding them (or step
  # folders of them) is safetensors; anything else Orbax.
  config.input.format = config_dict.placeholder(str)
  config.input.key_separator = '.'  # Safetensors: what splits a tensor's name into a key's parts.
  # Several inputs for merge ops, by name: each a group of `input`'s fields; instead of input.path.
  # (One directory's steps: input.step 'last:N', a list or a range, with merge ops.)
  config.inputs = ml_collections.ConfigDict()
  config.optimizer_from = config_dict.placeholder(str)  # Merges: the input whose optimizer state is kept.

  config.output = ml_collections.ConfigDict()
  config.output.path = config_dict.placeholder(str)  # Same layout as the input.
  config.output.format = 'orbax'  # Or 'safetensors': the layout transformers' save_pretrained writes.
  # Safetensors: the largest shard file, in bytes or as transformers writes it ('5GB', '500MB').
  config.output.max_shard_size = config_dict.placeholder(object)
  config.output.key_separator = '.'  # Safetensors: what stands for '/' in tensor names.
  config.output.extra_files = []  # Safetensors: files copied into the step (config.json, tokenizer).
  # Safetensors: config.json fields set over the one the ops made (llama_to_hf) or the input's.
  config.output.hf_config = ml_collections.ConfigDict()
  config.output.step = config_dict.placeholder(int)  # None: the input's step.
  # Orbax: the one item folder of the output step (MaxText loads `<step>/items`); with an input that
  # has no steps, setting it makes the output step `output.step` (default 0). None: the input's.
  config.output.item = config_dict.placeholder(str)
  config.output.overwrite = False  # False: refuse an existing output (step).
  config.output.wait_seconds = 0.0  # How long to wait for another run that holds the output's lock.
  config.output.lock_timeout_seconds = 60.0  # A lock silent this long is taken over.
  config.output.max_to_keep = config_dict.placeholder(int)  # Keep the newest N output steps.
  # Orbax: leaves passed through unchanged are copied as their stored chunks where they can be.
  config.output.copy_stored_chunks = True
  # Fields set in the output step's `custom_metadata`, over those of the input step (MaxText, for
  # one, keeps `scan_layers` there).
  config.output.custom_metadata = ml_collections.ConfigDict()
  # (key, length) pairs: subtrees written as sequences, as Orbax saves tuples (optax states), for
  # outputs whose input was not one (a converted flax.optim state); items without leaves are None.
  config.output.sequences = []

  # Follow a training run: convert each new committed input step as it appears.
  config.watch = ml_collections.ConfigDict()
  config.watch.enabled = False
  config.watch.poll_seconds = 30.0
  config.watch.idle_timeout_seconds = 3600.0  # Stop after this long with no new step.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = config_dict.placeholder(tuple)  # None: the saved mesh; -1 fills the rest.
  config.mesh.axes = config_dict.placeholder(tuple)  # None: the saved mesh's axis names.

  config.memory = ml_collections.ConfigDict()
  # Per process: stream the surgery in groups whose arrays fit this many GB; None: a share of
  # what the host has (surgery_job/memory.py); 0: no budget, one group.
  config.memory.host_budget_gb = config_dict.placeholder(float)

  config.params_root = config_dict.placeholder(str)  # None: 'params' if present, else the whole tree.
  config.transforms = []  # Ordered list of dicts, each with an 'op' (see README).
  config.partition_rules = []  # Ordered (regex, spec) pairs for leaves whose spec is not carried over.
  config.dry_run = False  # Plan, print the plan, write nothing.
  return config


def named_input() -> ml_collections.ConfigDict:
  """An entry of `inputs` for a ready config to hold: its path and step, set on the command line
  (`--config.inputs.NAME.path=...`)."""
  return ml_collections.ConfigDict({'path': config_dict.placeholder(str),
                                    'step': config_dict.placeholder(object)})


_FREE_FORM = ('output.custom_metadata', 'output.hf_config', 'inputs')  # Groups whose fields are the user's own.

# Every field's meaning: (one line for `surgery-job --help`, more for the README's table). The
# README's table is made from this one (`make readme`), so the two never disagree.
FIELD_DOCS = {
    'input.path': (
        'the checkpoint to read: an Orbax CheckpointManager directory or one PyTree checkpoint folder',
        'a directory holds numbered step folders, each holding item folders such as `default/`; '
        'also a legacy Flax msgpack file or folder of them, or safetensors (see `input.format`)'),
    'input.step': (
        "the step to read; None or `'latest'`: the latest committed step",
        "a list of steps, `'all'` (every committed step) or `'new'` (every committed step the output "
        'has never held: see `output.max_to_keep`): each converted and committed on its own, oldest '
        "first. A step folder is one whose name one of Orbax's standard step name formats gives (`3`, "
        'zero-padded `0003`, prefixed `step_3`; not `³`); it is committed unless it is an Orbax '
        'temporary folder (`*.orbax-checkpoint-tmp*`), holds no PyTree item, or lacks '
        "`commit_success.txt` where the directory's saves write one; newer uncommitted steps are "
        "skipped (logged), and naming one is an error. With a merge op, `'last:N'` (the N newest "
        'committed steps), a list or a `range` of steps are combined into one output at the newest '
        'step (see [Merging](#merging-several-checkpoints-into-one))'),
    'input.format': (
        "`'orbax'`, `'flax_msgpack'` or `'safetensors'`; None: told from the files",
        'see [Legacy Flax checkpoints](#legacy-flax-checkpoints) and '
        '[Formats](#formats-orbax-flax-msgpack-safetensors); a file named `checkpoint_<step>` or '
        'starting with a msgpack map, or a folder of `checkpoint_<step>` files with no Orbax '
        "checkpoint in it, is `'flax_msgpack'`; a `*.safetensors` file, a folder holding them (or "
        "`model.safetensors.index.json`), or a folder of numbered step folders of them is "
        "`'safetensors'`; anything else `'orbax'`"),
    'input.key_separator': (
        "safetensors input: what splits a tensor name into the job's `/`-joined key",
        '`model.norm.weight` -> `model/norm/weight`'),
    'input.item': (
        'None: every item of the step; a name: that PyTree item only',
        'with None, its PyTree items are planned together as one tree (with several, keys start '
        'with the item name: `params/...`, `opt_state/...`), items of other kinds (JSON, data '
        'iterators) copied byte for byte'),
    'inputs': (
        'instead of `input.path`: named inputs for the merge ops, each a group of `input` fields',
        "`--config.inputs.base.path=...`, `step`, `item`, `format`; names hold letters, digits, `_`, "
        '`-`, `.` (see [Merging](#merging-several-checkpoints-into-one))'),
    'optimizer_from': (
        "merges: the input whose optimizer state the output keeps; None: it is dropped", ''),
    'output.path': (
        "where the result appears, in the input's layout",
        'for a `CheckpointManager` input, a directory of step folders that a run adds its own step '
        'to (other steps are never touched)'),
    'output.step': (
        "the output's step (0 or more); None: the input's",
        'written as CheckpointManager names it (`<step>`); not with several input steps or `watch`'),
    'output.format': (
        "`'orbax'`, or `'safetensors'`: the files transformers' `save_pretrained` writes",
        'in the step folder (or in `output.path` itself, for an input with no steps)'),
    'output.max_shard_size': (
        "safetensors: the most tensor bytes in one file; None: `'5GB'`",
        "an int or a string as transformers reads it (`'5GB'` = 5*10^9, `'2GiB'` = 2*2^30)"),
    'output.key_separator': ('safetensors: what stands for `/` in tensor names', ''),
    'output.extra_files': (
        'safetensors: files copied into the step as they are',
        '`config.json`, tokenizer files, `generation_config.json`'),
    'output.hf_config': (
        'safetensors: config.json fields set over the one the ops made or the input folder had',
        '`llama_to_hf` makes one, a Hugging Face input brings its own; `rope_theta` goes into '
        '`rope_parameters`; the fields the shapes decide (`hidden_size`, heads, ...) are refused; an '
        '`output.extra_files` config.json is written instead'),
    'output.item': (
        'Orbax: the one item folder of the output step; None: the input\'s',
        '`items`, as MaxText loads `OUT/0/items`; with an input that has no steps (a Hugging Face '
        'folder, a single PyTree) it makes the output step `output.step` (default 0)'),
    'output.overwrite': (
        'replace an existing output checkpoint, only after the new one validated',
        'of the same kind (a step by a step, a single checkpoint by a single one); never a folder '
        'that is not a checkpoint (see [the output protocol]'
        '(#never-losing-a-checkpoint-the-output-protocol))'),
    'output.wait_seconds': (
        "how long to wait for another live run holding the output step's lock",
        '0: exit 2 naming it'),
    'output.lock_timeout_seconds': (
        'a lock whose heartbeat is older than this is taken over',
        'at once when its process on this host is gone'),
    'output.max_to_keep': (
        'keep the newest N exported steps; None: all of them',
        'older ones are deleted after each commit (see [Scheduled conversions]'
        '(#scheduled-conversions-beside-a-training-run))'),
    'output.copy_stored_chunks': (
        'Orbax to Orbax: leaves passed through unchanged are copied as their stored chunks',
        'where the stored chunks are what Orbax writes for the output sharding, never decoded (see '
        '[Bounded memory](#bounded-memory)); False: every leaf is read and written by Orbax'),
    'output.custom_metadata': (
        "fields set in the output step's `custom_metadata`, over the input step's", ''),
    'output.sequences': (
        '`(key, length)` pairs: subtrees written as sequences, as Orbax saves a tuple',
        "`[('opt_state', 2)]`: optax Adam's `(ScaleByAdamState, EmptyState)`, where the input had "
        "none; items holding no leaf are written as None (optax's `EmptyState`), a key outside "
        '`0..length-1` is an error'),
    'mesh.shape': (
        "the job's mesh shape; None: the saved mesh's, or its axes with the first filling the devices",
        'the saved mesh when the devices allow it; `-1` fills the rest; integers'),
    'mesh.axes': ("the job's mesh axis names; None: the saved mesh's", 'distinct names'),
    'memory.host_budget_gb': (
        'per process: stream the surgery in groups whose arrays fit this many GB',
        "inputs read and outputs written, and XLA's temporaries; None: 40% of what the host has "
        '(cgroup limit or MemAvailable) shared by its processes, and a plan that cannot fit is '
        'refused before any data moves; 0: no budget, one group'),
    'params_root': (
        'the subtree of parameters; None: `params`, flax.optim\'s `target`, or the whole tree',
        "`params` when present, else flax.optim's `target` or `optimizer/target` beside its "
        "`state`, else the whole tree (Flax NNX state; for a saved `{'model': nnx.state(model), "
        "'optimizer': nnx.state(optimizer)}` set `model` so that the moments follow)"),
    'transforms': (
        'ordered list of ops, each a dict with an `op` (see [Ops](#ops))',
        'on the command line a Python or JSON literal: '
        '`--config.transforms="[{\'op\': \'drop\', \'pattern\': \'head/.*\'}]"`'),
    'partition_rules': (
        'ordered `(regex, spec)` pairs for leaves whose sharding cannot be carried over',
        "e.g. `('head/kernel', (None, 'model'))`; first match (`re.search` on the full key or the "
        'path under `params_root`) wins; no match: replicated; on the command line a Python or JSON '
        'literal'),
    'watch.enabled': (
        'keep converting each new committed input step as it appears',
        "`input.step='new'`, polled until `watch.idle_timeout_seconds` pass with none; with "
        "`'last:N'`, each new step with N steps up to it becomes the average of those N"),
    'watch.poll_seconds': ('how often to look for new steps', ''),
    'watch.idle_timeout_seconds': ('stop after this long with no new step', ''),
    'dry_run': (
        'print the plan (every output leaf with shape, dtype, spec and sources), write nothing',
        '`output.path` may be left out'),
}


def field_defaults() -> dict[str, Any]:
  """{'input.path': None, ...}: every field the job reads and its default, in FIELD_DOCS' order,
  then any field it does not document."""
  found = {}

  def walk(group: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in group.items():
      if isinstance(value, ml_collections.ConfigDict) and prefix + key not in _FREE_FORM:
        walk(value, prefix + key + '.')
      else:
        found[prefix + key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  walk(get_default_config(), '')
  return {**{name: found[name] for name in FIELD_DOCS if name in found}, **found}


def with_defaults(user_config: Any) -> ml_collections.ConfigDict:
  """`user_config` laid over the defaults, unknown fields kept for `resolve` to report."""
  config = get_default_config()
  _merge(config, _as_dict(user_config), prefix='', strict=False)
  return config


def resolve(user_config: Any) -> ml_collections.ConfigDict:
  """Lays `user_config` over the defaults; an unknown, mistyped or bad field is a SurgeryError."""
  config = get_default_config()
  _merge(config, _as_dict(user_config), prefix='', strict=True)
  config.transforms = [_op_fields(i, t) for i, t in enumerate(config.transforms)]
  config.partition_rules = [_rule(i, r) for i, r in enumerate(config.partition_rules)]
  if not config.input.path and not config.inputs:
    raise SurgeryError('config: missing field input.path')
  if not config.output.path and not config.dry_run:
    raise SurgeryError('config: missing field output.path')
  budget = config.memory.host_budget_gb
  if budget is not None and budget < 0:
    raise SurgeryError(f'config: memory.host_budget_gb must be positive, or 0 for none, got {budget}')
  if config.input.format not in (None, 'orbax', 'flax_msgpack', 'safetensors'):
    raise SurgeryError(f"config: input.format must be 'orbax', 'flax_msgpack', 'safetensors' or "
                       f'None, got {config.input.format!r}')
  if config.output.format not in ('orbax', 'safetensors'):
    raise SurgeryError(f"config: output.format must be 'orbax' or 'safetensors', "
                       f'got {config.output.format!r}')
  config.output.max_shard_size = shard_size(config.output.max_shard_size)
  if config.output.item is not None and (not re.fullmatch(r'[\w.-]+', config.output.item)
                                         or config.output.item in ('.', '..')):
    raise SurgeryError(f'config: output.item must be a folder name, got {config.output.item!r}')
  for field in ('input.key_separator', 'output.key_separator'):
    group, name = field.split('.')
    if not config[group][name] or '/' in config[group][name]:
      raise SurgeryError(f"config: {field} must be a non-empty string without '/', "
                         f'got {config[group][name]!r}')
  config.output.sequences = [_sequence(i, s) for i, s in enumerate(config.output.sequences)]
  step = config.input.step
  if not (step in (None, 'latest', 'all', 'new') or _is_step(step) or inputs_lib.last_n(step) or (
      isinstance(step, (list, tuple, range)) and step and all(_is_step(s) for s in step))):
    raise SurgeryError("config: input.step must be a step number, a list or range of them, None, "
                       f"'latest', 'all', 'new' or 'last:N', got {step!r}")
  inputs_lib.resolve(config, get_default_config().input)
  if config.output.max_to_keep is not None and config.output.max_to_keep < 1:
    raise SurgeryError(f'config: output.max_to_keep must be at least 1, got {config.output.max_to_keep}')
  if config.output.step is not None and not _is_step(config.output.step):
    raise SurgeryError(f'config: output.step must be a step number (0 or more) or None, '
                       f'got {config.output.step!r}')
  if config.output.wait_seconds < 0 or config.output.lock_timeout_seconds <= 0:
    raise SurgeryError('config: output.wait_seconds must be 0 or more and '
                       f'output.lock_timeout_seconds more than 0, got {config.output.wait_seconds} '
                       f'and {config.output.lock_timeout_seconds}')
  _check_mesh(config.mesh.shape, config.mesh.axes)
  return config


_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default, '5GB'.


def shard_size(value: Any) -> int:
  """`output.max_shard_size` in bytes: an int, or a string as transformers reads it ('5GB': 10**9
  bytes a GB, '5GiB': 2**30); None: 5 GB."""
  if value is None:
    return DEFAULT_SHARD_SIZE
  found = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*', str(value), re.IGNORECASE)
  if isinstance(value, bool) or not isinstance(value, (int, str)) or not found or (
      isinstance(value, int) and value <= 0):
    raise SurgeryError("config: output.max_shard_size must be a number of bytes or a size like "
                       f"'5GB', got {value!r}")
  size = int(float(found.group(1)) * _UNITS[(found.group(2) or '').upper()])
  if size <= 0:
    raise SurgeryError(f'config: output.max_shard_size must be more than 0, got {value!r}')
  return size


def _is_step(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_mesh(shape: tuple | None, axes: tuple | None) -> None:
  """Types and names only; `sharding.make_mesh` fits the shape to the devices."""
  if shape is not None and not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
    raise SurgeryError(f'config: mesh.shape must hold integers, got {shape!r}')
  if axes is not None:
    if not all(isinstance(a, str) and a for a in axes):
      raise SurgeryError(f'config: mesh.axes must hold axis names (strings), got {axes!r}')
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
      raise SurgeryError(f'config: mesh.axes {axes!r} names axis {repeated[0]!r} twice')


def _op_fields(index: int, op: Any) -> dict:
  if not isinstance(op, (dict, ml_collections.ConfigDict)):
    raise SurgeryError(f"op {index}: expected a dict with an 'op' field, got {op!r}")
  return op.to_dict() if isinstance(op, ml_collections.ConfigDict) else dict(op)


def _sequence(index: int, pair: Any) -> tuple[str, int]:
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
      or not pair[0] or not _is_step(pair[1]) or not pair[1]):
    raise SurgeryError(f'config: output.sequences[{index}] must be a (key, length) pair, '
                       f'got {pair!r}')
  return pair[0], pair[1]


def _rule(index: int, rule: Any) -> tuple[str, tuple]:
  """A (regex, spec) pair; spec entries are None, an axis name, or a tuple of axis names."""
  where = f'partition_rules[{index}]'
  if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
    raise SurgeryError(f'{where}: expected a (regex, spec) pair, got {rule!r}')
  try:
    re.compile(rule[0])
  except re.error as e:
    raise SurgeryError(f'{where}: bad regex {rule[0]!r}: {e}') from None
  spec = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
  for entry in spec:
    names = entry if isinstance(entry, (tuple, list)) else (entry,)
    if not all(n is None or isinstance(n, str) for n in names):
      raise SurgeryError(f'{where}: spec {rule[1]!r} must hold None, axis names or tuples of them')
  return rule[0], tuple(tuple(e) if isinstance(e, list) else e for e in spec)


def _as_dict(value: Any) -> dict:
  """Placeholders stay references, so that a free-form group keeps each field's type for
  `--config.inputs.NAME.path=...` to set it."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict(preserve_field_references=True)
  return dict(value)


def _merge(defaults: ml_collections.ConfigDict, user: dict, prefix: str, strict: bool) -> None:
  for key, value in user.items():
    path = prefix + key
    if key not in defaults and not strict:
      defaults[key] = value
      continue
    if key not in defaults:
      raise SurgeryError(f'config: unknown field {path!r} (known: {", ".join(sorted(defaults.keys()))})')
    if isinstance(defaults[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise SurgeryError(f'config: field {path!r} is a group of fields, got {value!r}')
      if path in _FREE_FORM:
        defaults[key] = ml_collections.ConfigDict(_as_dict(value))
        continue
      _merge(defaults[key], _as_dict(value), prefix=path + '.', strict=strict)
      continue
    if isinstance(value, config_dict.FieldReference):
      value = value.get()
    expected = defaults.get_type(key)
    if isinstance(value, list) and expected is tuple:
      value = tuple(value)
    try:
      if isinstance(value, bool) and expected in (int, float):
        raise TypeError('ConfigDict would take a bool for a number')
      defaults[key] = value
    except TypeError:
      raise SurgeryError(f'config: field {path!r} expects {expected.__name__}, got {value!r}') from None
