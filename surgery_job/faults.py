"""Fault injection for tests: `SURGERY_JOB_FAULT=PHASE@PROCESS` raises at the start of that phase
on that process (`PHASE` alone: on every process). Unset in production, it does nothing."""

import os

import jax

ENV = 'SURGERY_JOB_FAULT'


class InjectedFault(RuntimeError):
  pass


def check(phase: str) -> None:
  spec = os.environ.get(ENV)
  if not spec:
    return
  name, _, process = spec.partition('@')
  if name == phase and (not process or int(process) == jax.process_index()):
    raise InjectedFault(f'injected fault in phase {phase} on process {jax.process_index()}')
