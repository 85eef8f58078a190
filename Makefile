PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the demo needs the package alone; the tests also need the test extra (media decoders, transformers)
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
DEMO_ARGS := --dataset avdigits --methods 'all,joint[model.fusion=mfb],ogm_ge[model.fusion=mfb],joint[pretrain=contrastive],modulate[method.modulate.actuator=loss_weight],modulate[method.modulate.actuator=feature_drop]' --seeds 0,1,2 --workers 2

.PHONY: demo check-demo test test-slow bench-overhead bench-startup clean-venv

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/poise bench $(DEMO_ARGS) --out runs/demo --overwrite

# a fresh demo in its own folder, compared with the README's demo table (every cell but train s)
check-demo: $(DEMO_STAMP)
	rm -rf runs/check-demo
	$(BIN)/poise bench $(DEMO_ARGS) --out runs/check-demo
	$(BIN)/python scripts/check_readme_demo.py runs/check-demo/results.json

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench-overhead: $(DEMO_STAMP)
	$(BIN)/python benchmarks/trainer_overhead.py

bench-startup: $(DEMO_STAMP)
	$(BIN)/python benchmarks/startup.py

clean-venv:
	rm -rf $(VENV)
