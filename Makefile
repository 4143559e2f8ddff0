# Two commands do all the set-up (README): `make demo` and `make test`. Each creates .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dynaexq demo

# Two workers (the CI machine's two cores), one test module each at a time: module fixtures are
# built once, and compiling on one core while the other runs halves the wall time.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/vs_llamacpp.py

clean:
	rm -rf $(VENV) runs
