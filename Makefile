# make demo: set up .venv, write the example CNN checkpoint, run a serving export on it and print
# its report, all in demo_out/, which it deletes first (README: the walk-through does the same).
# make test: set up .venv and run the whole test suite.
# make test-fast: the edit-test loop: tests that start no second JAX process, cluster or emulator.
# make lint: ruff (pyflakes' errors, sorted imports) and mypy over surgery_job/, in seconds.
# make readme: the README's tables of fields and exit codes, made again from surgery_job/config.py.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo_out
# Eight fake CPU devices where there is no accelerator: the example is sharded over a 2x4 mesh.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

$(VENV)/installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/installed

demo: setup
	rm -rf $(DEMO)
	$(BIN)/python -m surgery_job.example --path=$(DEMO)/cnn
	$(BIN)/surgery-job --config=configs/params_only_bf16.py \
	    --config.input.path=$(DEMO)/cnn --config.output.path=$(DEMO)/cnn_serving
	$(BIN)/surgery-job-report $(DEMO)/cnn_serving

# Two workers, one test file each at a time: most tests wait on a job's subprocesses, and a file's
# fixtures (a Slurm cluster, an emulator) stay in one worker.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

FAST_TESTS := $(addprefix tests/test_,$(addsuffix .py,transforms heads safetensors_file llama lock progress \
    cast_errors report_cli bad_input output_path input_checks items configs hostile_configs usage))

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 $(FAST_TESTS)

lint: setup
	$(BIN)/ruff check surgery_job tests configs bench
	$(BIN)/mypy surgery_job

readme: setup
	$(BIN)/python -m surgery_job.usage --readme README.md

.PHONY: setup demo test test-fast lint readme
