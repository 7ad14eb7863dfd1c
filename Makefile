# Two commands for a fresh machine with only Python 3.11:
#   make demo   — install into .venv and run the main job
#   make test   — install into .venv and run the test suite
# torch==2.13.0 is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,hf,fp8,data]"
	# LLaVA-1.5's own code for the hand-off test, without its pinned (2023) dependencies
	$(PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

# the whole suite (what .ci/run calls); ends with its 25 slowest tests and the total time. The venv's bin comes
# first on PATH for every process the tests start: its ninja (1.13) and a system ninja (1.11) read each other's build
# logs as stale, so a suite that mixed them rebuilt DeepSpeed's CPU comm op (a minute or two) at every switch
TEST_ENV = PATH="$(abspath $(VENV))/bin:$$PATH"
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests --durations=25

# the developer loop: unit tests and in-process CLI tests, no launches
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests -m "not slow" --durations=10

clean:
	rm -rf $(VENV) runs
