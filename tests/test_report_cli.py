"""`surgery-job-report` as scripts use it: a run's summary, the report as JSON, help, one-line errors;
and every tool's output piped into a reader that stops early ends quietly."""

import json
import subprocess
import sys

from jobs import REPO, ok, surgery


def report_command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'surgery_job.report', *args], cwd=REPO,
                        capture_output=True, text=True, check=False)


def test_report_summarizes_a_run_and_prints_it_as_json(layered, tmp_path):
  out, result = surgery(tmp_path, layered[0], [dict(op='drop', pattern='head/.*')])
  ok(result)
  summary = report_command(str(out))
  assert summary.returncode == 0, summary.stderr
  assert summary.stdout.splitlines()[0].endswith(f'{out} (step 3) on mesh {{\'data\': 2, \'model\': 4}}')
  assert '  op 0 (drop): 6 keys touched' in summary.stdout
  whole = report_command(str(out / '3'), '--json')
  assert json.loads(whole.stdout) == json.loads((out / '3' / 'surgery_report.json').read_text())


def test_report_help_and_errors_are_one_line(tmp_path):
  helped = report_command('--help')
  assert helped.returncode == 0 and 'surgery_report.json' in helped.stdout
  missing = report_command()
  assert missing.returncode == 2
  assert missing.stderr == 'surgery-job-report: error: the following arguments are required: path\n'
  absent = report_command(str(tmp_path / 'nowhere'))
  assert (absent.returncode, absent.stderr) == (2, f'surgery-job-report: error: {tmp_path / "nowhere"} does not exist\n')
  (tmp_path / 'empty').mkdir()
  empty = report_command(str(tmp_path / 'empty'))
  assert empty.stderr == f'surgery-job-report: error: no surgery_report.json in {tmp_path / "empty"} or its step folders\n'


def test_a_pipe_closed_early_ends_quietly():
  # More than a pipe holds, so the writer is still writing when `head` has gone.
  noisy = ("import sys; from surgery_job import cli; "
           "sys.exit(cli.run('tool', lambda argv: [print('x' * 1000) for _ in range(1000)] and 0))")
  result = subprocess.run(['bash', '-c', f'"{sys.executable}" -c "{noisy}" | head -c 10 >/dev/null; '
                           'echo "${PIPESTATUS[0]}"'], cwd=REPO, capture_output=True, text=True, check=True)
  assert (result.stdout, result.stderr) == ('0\n', '')
