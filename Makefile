# Set-up and the commands of the README. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo

.PHONY: demo test gpu-check install clean-demo

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

install: $(STAMP)

# Train on the embedded synthetic dataset on CPU, then evaluate the best checkpoint.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) trainSSL.py --config configs/demo.json --device cpu --set utils.checkpoint_dir=$(DEMO_DIR)
	$(PY) evaluateSSL.py --model-path $(DEMO_DIR)/best_model.pth --device cpu

test: $(STAMP)
	$(PY) -m pytest -q tests

# On a machine with CUDA: tests, demo training, benchmarks and targets in at most 8 minutes; writes
# benchmarks/gpu_check.json and benchmarks/gpu_check.md. Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean-demo:
	rm -rf $(DEMO_DIR)
