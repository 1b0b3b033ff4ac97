# The two commands the README gives. Each builds its own environment on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch pair that installs from this machine's disk; pyproject's range admits it.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml plugins/tltk-example-plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,hf,deploy,explain]'
	$(PY) -m pip install --quiet -e plugins/tltk-example-plugin
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/transfer_demo.py --out runs/demo

# A plain pytest leaves out the slow torchrun tests; the second line runs them. The tests marked
# `precision` run twice: in the precision `auto` picks on this CPU, then in the
# other one (bf16, emulated and slower, where the CPU lacks it; fp32 where it has it), so both
# paths are tested whichever CPU the machine has.
test: venv
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow
	$(PY) -m pytest -q -m precision --precision other

clean:
	rm -rf $(VENV) runs .pytest_cache
