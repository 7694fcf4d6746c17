"""`surgery-job --help`, and the README's tables of fields and exit codes, from one source each:
the fields and their docs in config.py, the ops in transforms.OPS, the ready configs' docstrings.

  python -m surgery_job.usage --readme README.md   # rewrites the README's generated tables (make readme)
"""

import ast
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from surgery_job import config as config_lib, transforms

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
REQUIRED = ('input.path', 'output.path')  # Checked by config.resolve; shown so in the tables.

EXIT_CODES = {
    0: 'done, or already done (the output holds this same surgery)',
    1: 'failed at run time; nothing was committed',
    2: 'bad config or input: one line on stderr (`surgery-job: error: ...`), no traceback, nothing '
       'written (see [Bad config and input](#bad-config-and-input))',
    75: 'stopped by SIGTERM (a preemption notice); nothing was committed; run it again (a SIGTERM '
        'after the commit ends the run with 0)',
    130: 'stopped by Ctrl-C (SIGINT), as SIGTERM stops it: one line, nothing committed, the written '
         'groups kept; run it again to resume',
}

BEGIN = '<!-- Made from surgery_job/config.py and usage.py by `make readme`: edit those, not this. -->'
END = '<!-- End of the generated tables. -->'

_EXAMPLE = ('surgery-job --config=configs/params_only_bf16.py --config.input.path=demo_out/cnn '
            '--config.output.path=demo_out/cnn_serving')


def default_text(name: str, value: Any) -> str:
  if name in REQUIRED:
    return 'required'
  return repr(value)


def plain(markdown: str) -> str:
  """Markdown as a terminal shows it: links as their text."""
  return re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', markdown).replace('\\|', '|')


def readme_tables() -> str:
  """The README's tables of every field (default, meaning) and of the exit codes."""
  docs = config_lib.FIELD_DOCS
  lines = ['| field | default | meaning |', '|---|---|---|']
  for name, value in config_lib.field_defaults().items():
    summary, details = docs.get(name, ('', ''))
    meaning = f'{summary}; {details}' if details else summary
    default = default_text(name, value)
    lines.append(f'| `{name}` | {default if name in REQUIRED else f"`{default}`"} | {meaning} |')
  lines += ['', '| exit code | meaning |', '|---|---|']
  lines += [f'| `{code}` | {meaning} |' for code, meaning in EXIT_CODES.items()]
  return '\n'.join(lines)


def op_signature(name: str) -> str:
  """`rename(pattern, replacement, allow_empty=False)`: an op's fields as a config dict names them."""
  fields = [p.name if p.default is p.empty else f'{p.name}={p.default!r}'
            for p in inspect.signature(transforms.OPS[name]).parameters.values()]
  return f'{name}({", ".join(fields)})'


def first_sentence(doc: str | None) -> str:
  """A docstring's first sentence, on one line."""
  paragraph = ' '.join((doc or '').split('\n\n')[0].split())
  return re.split(r'(?<=\.)\s', paragraph, maxsplit=1)[0]


def op_summary(name: str) -> str:
  return first_sentence(inspect.getdoc(transforms.OPS[name]))


def ready_configs() -> dict[str, str]:
  """{file name: its docstring's first sentence} of configs/*.py, where the checkout has them."""
  return {path.name: first_sentence(ast.get_docstring(ast.parse(path.read_text())))
          for path in sorted(CONFIGS.glob('*.py'))}


def _columns(rows: Iterable[tuple[str, str]]) -> list[str]:
  rows = list(rows)
  width = max(len(left) for left, _ in rows)
  return [f'  {left:<{width}}  {right}'.rstrip() for left, right in rows]


def text(job_flags: Iterable[tuple[str, Any, str]]) -> str:
  """The whole help; `job_flags`: (name, default, help) of the command's own flags besides --config."""
  docs = config_lib.FIELD_DOCS
  fields = [(f'{name} = {default_text(name, value)}', plain(docs.get(name, ('', ''))[0]))
            for name, value in config_lib.field_defaults().items()]
  configs = ready_configs()
  lines = [
      'surgery-job: sharded checkpoint surgery for JAX/Flax/Orbax. It restores a checkpoint on every',
      "host, runs a config's ops under jax.jit, writes the result, checks every leaf bit for bit, commits.",
      '',
      'Usage: surgery-job --config=CONFIG.py[:ARG] [--config.FIELD=VALUE ...]',
      "Example, make demo's serving export (--config.dry_run=True prints the plan, writes nothing):",
      f'  {_EXAMPLE}',
      '',
      'Fields (--config.FIELD=VALUE; a list field takes a Python or JSON literal):',
      *_columns(fields),
      '',
      "Ops (a transforms entry is {'op': NAME, FIELD: VALUE, ...}; patterns are regexes on the keys",
      "under params_root, or on full keys when they start with '/'):",
      *(f'  {op_signature(name)}\n      {op_summary(name)}'.rstrip() for name in transforms.OPS),
  ]
  if configs:
    lines += ['', f'Ready configs ({CONFIGS}; the docstring of each has its command):',
              *_columns((name, plain(summary)) for name, summary in configs.items())]
  lines += ['', 'Other flags (--helpfull lists every flag):',
            *_columns((f'--{name}={default}', help_text) for name, default, help_text in job_flags),
            '', 'Exit codes:', *_columns((str(code), plain(m)) for code, m in EXIT_CODES.items())]
  return '\n'.join(lines)


def with_tables(readme: str) -> str:
  """`readme` with its generated tables (between BEGIN and END) made again."""
  start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
  return f'{readme[:start]}\n{readme_tables()}\n{readme[end:]}'


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] != '--readme':
    print('usage: python -m surgery_job.usage --readme README.md', file=sys.stderr)
    return 2
  readme = Path(argv[1])
  readme.write_text(with_tables(readme.read_text()))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
