# Set-up and the two commands of the README. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo

.PHONY: demo test install clean-demo

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

clean-demo:
	rm -rf $(DEMO_DIR)
