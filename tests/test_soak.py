"""A randomized soak: multi-step, 'new' with max_to_keep and watch runs share one export directory
beside a trainer that adds input steps and deletes them (its own max_to_keep, roll-backs), and are
stopped at random moments: SIGTERM, SIGKILL or SIGSTOP (sometimes past the lock timeout, with a
rival run meanwhile), at one of the job's pause points or after a random sleep. After each stop
the rerun finishes; after each round every committed output step equals the surgery of one
version of its input step, computed with numpy, bit for bit; a step another program saved in the
export directory, a file beside it and the input's bytes are unchanged; after a final clean run
no lock or staging folder is left.

SURGERY_JOB_SOAK=N runs N rounds (default 2); a failure names its seed, and
SURGERY_JOB_SOAK_SEED=S replays its schedule (the timing is the machine's).
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import checkpoints
from jobs import REPO, job_command, job_env, write_config
from soak_trainer import file_hashes, state_at

ROUNDS = int(os.environ.get('SURGERY_JOB_SOAK', '2'))
TRANSFORMS = [dict(op='drop_optimizer'),
              dict(op='stack', pattern=r'layers_(\d+)/(.*)', replacement=r'layers/\2')]
LOCK_TIMEOUT = 2.0
TRAINER_KEEPS = 3
ROLL_BACKS = 0.3  # The share of rounds that end with the trainer rolling back.
KINDS = ['multi', 'new', 'watch']
PAUSE_POINTS = ['read', 'restore', 'writing', 'group_written', 'finalize', 'validate', 'commit',
                'rename', 'renamed']
BUDGETS = ['4e-6', '4e-6', '0']  # Mostly many groups (a stopped run has groups to resume from).
NOTES = {'notes/keep.txt': b'beside the export directory'}
FOREIGN_STEP = 0  # A step of the export directory saved by plain Orbax, not by the job.
# Exit 2 where the README documents it: a live run holds the step; a named step is gone.
HELD, GONE = 'is being written by another run', 'not found in'


def expected(step: int, version: int) -> dict[str, np.ndarray]:
  """TRANSFORMS on the trainer's state of `step`, in numpy: the optimizer dropped, the layers
  stacked."""
  flat = {k: v for k, v in checkpoints.flat_numpy(state_at(step, version)).items()
          if not k.startswith('opt_state/')}
  layered = collections.defaultdict(dict)
  for key in list(flat):
    if match := re.fullmatch(r'params/layers_(\d+)/(.*)', key):
      layered[match[2]][int(match[1])] = flat.pop(key)
  for rest, layers in layered.items():
    flat[f'params/layers/{rest}'] = np.stack([layers[i] for i in sorted(layers)])
  return flat


def differing(got: dict, want: dict) -> list[str]:
  keys = sorted(set(got) | set(want))
  return [k for k in keys if k not in got or k not in want or got[k].dtype != want[k].dtype
          or not np.array_equal(got[k], want[k])]


@dataclasses.dataclass
class Run:
  """One job process: its kind, its command-line overrides and its log (stderr)."""
  kind: str
  overrides: list[str]
  process: subprocess.Popen
  log: Path

  def stderr(self) -> str:
    return self.log.read_text(errors='replace')


class Soak:
  """One input directory, its trainer, one export directory, and the runs on them."""

  def __init__(self, root: Path, seed: int):
    self.rng = random.Random(seed)
    self.root, self.input, self.out = root, root / 'in', root / 'out'
    self.config = write_config(root, {'transforms': TRANSFORMS,
                                      'output': {'lock_timeout_seconds': LOCK_TIMEOUT}})
    self.record = root / 'trainer.jsonl'
    self.record.touch()
    (root / 'logs').mkdir()
    self.events: list[str] = []
    self.start_time = time.monotonic()
    self.processes: list[subprocess.Popen] = []
    self.background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.next_step = 1
    self.trainer = self._popen(
        [sys.executable, str(REPO / 'tests' / 'soak_trainer.py'), str(self.input),
         str(self.record), str(TRAINER_KEEPS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    self._place_foreign()

  def note(self, text: str) -> None:
    self.events.append(f'{time.monotonic() - self.start_time:6.1f} s  {text}')

  def _popen(self, command, **kwargs) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=REPO, env=job_env(env=kwargs.pop('env', None)), **kwargs)
    self.processes.append(process)
    return process

  def _place_foreign(self) -> None:
    """What the job must leave as it is: a file beside the export directory, and in it a step
    that another program saved (the output rules accept it; it is not the job's to prune)."""
    for name, data in NOTES.items():
      (self.root / name).parent.mkdir(parents=True)
      (self.root / name).write_bytes(data)
    checkpoints.save_manager(self.out, {'w': np.arange(4.0)}, step=FOREIGN_STEP)
    self.foreign = {**NOTES, **{str(f.relative_to(self.root)): f.read_bytes()
                                for f in (self.out / str(FOREIGN_STEP)).rglob('*') if f.is_file()}}

  # The trainer.

  def save(self, step: int, version: int = 0) -> None:
    self.trainer.stdin.write(f'save {step} {version}\n')
    self.trainer.stdin.flush()
    assert self.trainer.stdout.readline().split() == ['done', str(step)], 'the trainer failed'
    self.note(f'trainer saved step {step} (version {version})')

  def train(self, count: int) -> concurrent.futures.Future:
    """Saves `count` new steps in the background, a random pause before each."""
    steps = [self.next_step + i for i in range(count)]
    self.next_step += count
    pauses = [self.rng.uniform(0.1, 2.0) for _ in steps]

    def saves():
      for step, pause in zip(steps, pauses):
        time.sleep(pause)
        self.save(step)
    return self.background.submit(saves)

  def versions(self) -> dict[int, list[int]]:
    """{step: every version the trainer saved of it}."""
    found = collections.defaultdict(list)
    for line in self.record.read_text().splitlines():
      entry = json.loads(line)
      found[entry['step']].append(entry['version'])
    return found

  def input_steps(self) -> list[int]:
    return sorted(int(p.name) for p in self.input.iterdir() if p.name.isdigit())

  def roll_back(self) -> None:
    """The trainer restarts from before a step and saves it again with other values; preferably a
    step a stopped run left staged."""
    present = self.input_steps()
    staged = [s for s in present if (self.out / f'{s}.orbax-checkpoint-tmp-surgery').exists()]
    step = self.rng.choice(staged or present[-2:])
    self.note(f'roll-back to step {step}')
    self.save(step, max(self.versions()[step]) + 1)

  # Runs of the job.

  def overrides(self, kind: str) -> list[str]:
    chosen = [f'--config.memory.host_budget_gb={self.rng.choice(BUDGETS)}']
    if kind == 'multi':
      named = self.input_steps()[-self.rng.randint(1, 2):]  # The trainer may delete them.
      chosen.append('--config.input.step=' + self.rng.choice(['all', json.dumps(named)]))
    elif kind == 'new':
      chosen += ['--config.input.step=new', f'--config.output.max_to_keep={self.rng.randint(2, 3)}']
    else:
      chosen += ['--config.watch.enabled=True', '--config.watch.poll_seconds=0.3',
                 '--config.watch.idle_timeout_seconds=2.0']
      if self.rng.random() < 0.5:
        chosen.append(f'--config.output.max_to_keep={self.rng.randint(2, 3)}')
    return chosen

  def start(self, kind: str, overrides: list[str], pause_point: str | None = None) -> Run:
    log = self.root / 'logs' / f'{len(self.processes):03d}-{kind}.log'
    env = {'SURGERY_JOB_PAUSE': pause_point, 'SURGERY_JOB_PAUSE_FILE': str(log.with_suffix('.paused'))
           } if pause_point else None
    with log.open('w') as stderr:
      process = self._popen(job_command(self.config, f'--config.input.path={self.input}',
                                        f'--config.output.path={self.out}', *overrides),
                            env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    self.note(f'{log.stem} started: {" ".join(overrides)}'
              + (f' (pausing at {pause_point})' if pause_point else ''))
    return Run(kind, overrides, process, log)

  def ended(self, run: Run, stopped_by: str | None = None) -> int:
    """Waits for `run`; its exit must be one the README documents (after `stopped_by`)."""
    code = run.process.wait(timeout=300)
    stderr = run.stderr()
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ''
    self.note(f'{run.log.stem} exited {code}: {last[-200:]}')
    allowed = {0} | ({2} if HELD in last or (GONE in last and run.kind == 'multi') else set())
    allowed |= {'SIGTERM': {75}, 'SIGKILL': {-signal.SIGKILL}, 'SIGSTOP': {1, 75}}.get(stopped_by, set())
    assert code in allowed, f'{run.log.stem} exited {code}: {stderr[-3000:]}'
    if code in (0, 2, 75):
      assert 'Traceback' not in stderr, f'{run.log.stem}: {stderr[-3000:]}'
    return code

  def stop(self, run: Run, pause_point: str | None) -> None:
    """Stops `run` at its pause point, or at a random moment once it is into its first step,
    unless it ended first."""
    if pause_point:
      self.wait_for(run, lambda: run.log.with_suffix('.paused').exists())
      how = self.rng.choice(['SIGTERM', 'SIGKILL'])
    else:
      self.wait_for(run, lambda: 'Mesh ' in run.stderr())
      time.sleep(self.rng.uniform(0.0, 5.0))
      how = self.rng.choice(['SIGTERM', 'SIGKILL', 'SIGSTOP'])
    if run.process.poll() is not None:
      self.ended(run)
      return
    self.note(f'{how} to {run.log.stem}')
    if how == 'SIGSTOP':
      self.suspend(run)
    else:
      run.process.send_signal(getattr(signal, how))
      # The pause ends: a SIGTERM inside the commit (rename, renamed) lets the commit finish.
      run.log.with_suffix('.paused').unlink(missing_ok=True)
    self.ended(run, how)

  def suspend(self, run: Run) -> None:
    """SIGSTOP, then SIGCONT: soon, or past the lock timeout, or once a rival run took the lock
    over (while the rival writes)."""
    run.process.send_signal(signal.SIGSTOP)
    start, rival = time.monotonic(), None
    way = self.rng.choice(['soon', 'late', 'rival'])
    if way == 'soon':
      time.sleep(self.rng.uniform(0.2, 0.8) * LOCK_TIMEOUT)
    elif way == 'late':
      time.sleep(self.rng.uniform(1.5, 3.0) * LOCK_TIMEOUT)
    else:
      kind = self.rng.choice(KINDS)
      rival = self.start(kind, self.overrides(kind))
      self.wait_for(rival, lambda: 'Taking over the lock' in rival.stderr())
      time.sleep(self.rng.uniform(0.0, 2.0))
    run.process.send_signal(signal.SIGCONT)
    self.note(f'SIGCONT to {run.log.stem} after {time.monotonic() - start:.1f} s')
    if rival:
      self.ended(rival)
    try:
      run.process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # A watch goes on: end it as a preemption would.
      run.process.send_signal(signal.SIGTERM)

  @staticmethod
  def wait_for(run: Run, condition) -> None:
    while run.process.poll() is None and not condition():
      time.sleep(0.1)

  def rerun_until_done(self, run: Run) -> None:
    """Runs `run`'s command again, alone, until it ends as done (or a named step is gone)."""
    for _ in range(3):
      again = self.start(run.kind, run.overrides)
      if self.ended(again) == 0 or GONE in again.stderr():
        return
    raise AssertionError(f'{run.log.stem}: three reruns did not finish')

  # What must hold.

  def committed(self) -> list[int]:
    return [s for s in checkpoints.visible_steps(self.out) if s != FOREIGN_STEP]

  def check(self) -> None:
    versions = self.versions()
    for step in self.committed():
      got = checkpoints.flat_numpy(checkpoints.restore_plain(self.out / str(step) / 'default'))
      wrong = {v: differing(got, expected(step, v)) for v in versions.get(step, [])}
      assert [] in wrong.values(), (
          f'output step {step} is not the surgery of any version of input step {step}; '
          f'the leaves that differ from each version: {wrong}')
    for name, data in self.foreign.items():
      path = self.root / name
      assert path.is_file() and path.read_bytes() == data, f'{name} was changed or deleted'
    saved = {json.loads(line)['step']: json.loads(line)['files']
             for line in self.record.read_text().splitlines()}
    for entry in self.input.iterdir():
      assert entry.name.isdigit() and int(entry.name) in saved, f'input: {entry} was not saved there'
      assert file_hashes(entry) == saved[int(entry.name)], f'input step {entry.name} changed'
    self.note(f'checked: output steps {self.committed()}, input steps {self.input_steps()}')

  def check_no_leftovers(self) -> None:
    left = sorted(p.name for p in self.out.iterdir()
                  if '.surgery-lock' in p.name or '.orbax-checkpoint-tmp' in p.name)
    assert not left, f'left in {self.out} after a clean run: {left}'

  # The schedule.

  def round(self) -> None:
    training = self.train(self.rng.randint(1, 4))
    pause_point = self.rng.choice(PAUSE_POINTS) if self.rng.random() < 0.6 else None
    kind = self.rng.choice(KINDS)
    victim = self.start(kind, self.overrides(kind), pause_point)
    peers = []
    if self.rng.random() < 0.5:
      peer_kind = self.rng.choice(KINDS)
      peers.append(self.start(peer_kind, self.overrides(peer_kind)))
    self.stop(victim, pause_point)
    for peer in peers:
      self.ended(peer)
    training.result()
    if self.rng.random() < ROLL_BACKS:
      self.roll_back()
    self.rerun_until_done(victim)
    self.check()

  def run(self, rounds: int) -> None:
    for step in range(1, 3):
      self.save(step)
    self.next_step = 3
    for _ in range(rounds):
      self.round()
    final = self.start('multi', ['--config.input.step=all'])
    assert self.ended(final) == 0
    self.check()
    self.check_no_leftovers()

  def close(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()
    self.background.shutdown(cancel_futures=True)


def test_soak(tmp_path):
  seed = int(os.environ.get('SURGERY_JOB_SOAK_SEED') or random.randrange(2**32))
  soak = Soak(tmp_path, seed)
  try:
    soak.run(ROUNDS)
  except (AssertionError, subprocess.TimeoutExpired) as e:
    raise AssertionError(f'SURGERY_JOB_SOAK_SEED={seed} (logs in {tmp_path / "logs"}): {e}\n'
                         + '\n'.join(soak.events)) from None
  finally:
    soak.close()
    print(f'SURGERY_JOB_SOAK_SEED={seed}', *soak.events, sep='\n')
