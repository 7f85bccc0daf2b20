# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv and install the pinned stack (constraints.txt) first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-cluster install bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# CPU wheel first: otherwise torchvision's dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vae demo

test: $(STAMP)
	$(PY) -m pytest -q

# The production shape on two hosts (network namespaces; as root) alone: tests/cluster, about 4 minutes.
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster tests/cluster

bench: $(STAMP)
	$(PY) bench/train_loop.py

clean:
	rm -rf $(VENV) .vae
