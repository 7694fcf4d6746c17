# Sourced by the launch scripts. `find_job REPO` sets `job`, the command that runs surgery_job:
# SURGERY_JOB if set (split on spaces), else REPO/.venv/bin/surgery-job (what `make setup` made),
# else surgery-job on PATH, else `python3 -m surgery_job` where python3 can import it. When none
# is found it calls the script's `die`.
find_job() {
  local repo=$1
  if [[ -n ${SURGERY_JOB+set} ]]; then
    read -r -a job <<<"$SURGERY_JOB"
    ((${#job[@]})) || die "SURGERY_JOB is empty"
  elif [[ -x $repo/.venv/bin/surgery-job ]]; then
    job=("$repo/.venv/bin/surgery-job")
  elif command -v surgery-job >/dev/null; then
    job=(surgery-job)
  elif python3 -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("surgery_job"))' 2>/dev/null; then
    job=(python3 -m surgery_job)
  else
    die "no surgery_job found: run 'make setup' (it makes $repo/.venv), or install the package, or set SURGERY_JOB"
  fi
}
