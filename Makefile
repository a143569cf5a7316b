# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench fashion-mnist clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision as a pair that imports together (see README: Environment)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST: Debian package when apt is available, else the official download, else
# a directory named by ZOO_AUDIT_FASHION_MNIST (python -m audit.data.fetch says which).
fashion-mnist: $(STAMP)
	@if ! $(PY) -m audit.data.fetch >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || true; \
	  fi; \
	  $(PY) -m audit.data.fetch --download; \
	fi

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/zoo-audit demo --out runs/demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check audit cluster serve tests benchmarks

clean:
	rm -rf runs .pytest_cache
