# The two commands of the README: `make demo` and `make test`. Both create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= var/demo
# A real Triton Inference Server (nvidia-pytriton) for the driver's Open Inference Protocol test, in a venv
# of the system's Python 3.11: the Triton Python-backend stub embeds the system libpython (tests/triton_toy_model.py).
SYSTEM_PY ?= /usr/bin/python3.11
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: demo test test-deps test-gpu install clean

$(STAMP): pyproject.toml constraints-ci.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints-ci.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(TRITON_STAMP):
	test -x $(TRITON_VENV)/bin/python || $(SYSTEM_PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --disable-pip-version-check nvidia-pytriton==0.6.0 'numpy<3'
	touch $(TRITON_STAMP)

demo: $(STAMP)
	$(BIN)/python -m prepare.demo --dir $(DEMO_DIR)

test: $(STAMP) $(TRITON_STAMP) test-deps
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

# Tools the operations tests run (promtool, prometheus, systemd-analyze): Debian packages.
test-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v systemd-analyze >/dev/null || \
	  { [ "$$(id -u)" = 0 ] || { echo "test-deps: run as root or: apt-get install prometheus systemd" >&2; exit 1; }; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus systemd; }

# On the GPU machine (no venv there): python3 -m pytest -m gpu
test-gpu:
	python3 -m pytest -q -m gpu

clean:
	rm -rf $(VENV) $(TRITON_VENV) var build *.egg-info
