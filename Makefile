PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench-overhead clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/poise bench --dataset avdigits --methods 'all,joint[model.fusion=mfb],ogm_ge[model.fusion=mfb],joint[pretrain=contrastive]' --seeds 0,1,2 --out runs/demo --workers 2

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench-overhead: $(STAMP)
	$(BIN)/python benchmarks/trainer_overhead.py

clean-venv:
	rm -rf $(VENV)
