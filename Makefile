# Set-up and the commands of the README. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo

.PHONY: demo test gpu-check install clean-demo mutants

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

install: $(STAMP)

# Train on the embedded synthetic dataset on CPU, evaluate the best checkpoint, then segment a few scenes written
# out as image files (at another size than in training) with predict.py. The run directory runs/demo is demo.json's
# utils.checkpoint_dir (runs) and the config's name (utils.run_name null); `rm -rf` starts it afresh each time.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) trainSSL.py --config configs/demo.json --device cpu
	$(PY) evaluateSSL.py --model-path $(DEMO_DIR)/best_model.pth --device cpu
	$(PY) -m data.synthetic --export $(DEMO_DIR)/scenes --num-train 0 --num-val 4 --image-size 120,200 > /dev/null
	$(PY) predict.py --model-path $(DEMO_DIR)/best_model.pth --input $(DEMO_DIR)/scenes/val/images \
		--out $(DEMO_DIR)/predictions --overlay --device cpu
	@echo "pictures: $(DEMO_DIR)/predictions/ (*_color.png, *_classes.png, *_overlay.jpg); training curves: $(DEMO_DIR)/curves.png"

# Two pytest-xdist workers (one compute thread each), whole files each, the costliest first (tests/conftest.py): the
# CI machine has two cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# On a machine with CUDA: tests, demo training, benchmarks and targets in at most 8 minutes; writes
# benchmarks/gpu_check.json and benchmarks/gpu_check.md. Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Mutation testing (a developer tool, not CI): mutmut over utils/ and model/, each module's mutants against the fast
# test files setup.cfg's [mutants] lists for it; then the score per module (tests/mutation.py). All modules take many
# hours on two cores: MUTANTS narrows it (MUTANTS="utils/ssl_steps.py utils/memory_bank.py"); MUTANT_JOBS test
# processes (one thread each). Results stay in mutants/; `$(PY) -m mutmut results` lists the survivors and
# `$(PY) -m mutmut show NAME` shows one.
MUTANTS ?= $(shell sed -n '/^\[mutants\]/,$$p' setup.cfg | sed -n 's/^\([a-z_/]*\.py\) = .*/\1/p')
MUTANT_JOBS ?= 2
mutants: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	mkdir -p mutants && cp -r docs mutants/  # a test holds --help to docs/configuration.md's flag table
	SSL_TEST_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m mutmut run --max-children $(MUTANT_JOBS) \
		$(foreach m,$(MUTANTS),"$(subst /,.,$(m:.py=)).*")
	$(PY) tests/mutation.py $(MUTANTS)

clean-demo:
	rm -rf $(DEMO_DIR)
