# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench fashion-mnist chromium clean

# pip's output goes to .venv/pip.log (shown when an install fails): a mirror's warnings
# would otherwise bury the demo's output
PIP := $(PY) -m pip install -q
PIPLOG := $(VENV)/pip.log
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (first run only: a few minutes)"
	@python3 -m venv $(VENV)
	@$(PIP) --upgrade pip > $(PIPLOG) 2>&1 || { cat $(PIPLOG); exit 1; }
	@# torch and torchvision as a pair that imports together (see README: Environment)
	@$(PIP) "torch==2.14.1" "torchvision==0.29.1" >> $(PIPLOG) 2>&1 || { cat $(PIPLOG); exit 1; }
	@$(PIP) -e ".[all,dev]" >> $(PIPLOG) 2>&1 || { cat $(PIPLOG); exit 1; }
	@touch $(STAMP)

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

# Chromium for the report's browser test (tests/test_report.py): Debian's package when apt is
# available; if it cannot be installed, that one test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "chromium could not be installed: the report's browser test will be skipped"; \
	  fi

demo: $(STAMP) fashion-mnist
	@$(VENV)/bin/zoo-audit demo --out runs/demo

test: $(STAMP) fashion-mnist chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check audit cluster serve tests benchmarks
	$(VENV)/bin/ruff format --check audit cluster serve tests benchmarks

clean:
	rm -rf runs .pytest_cache
