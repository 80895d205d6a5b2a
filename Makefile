# qat: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install train test test-heavy lint bench tensorboard experiments coverage clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install qat with its pinned dependencies

train: $(STAMP) ## float -> quant -> export on the embedded digits dataset (runs/default)
	$(PY) -m qat.train phase=all $(ARGS)

TEST_WORKERS ?= 2
test: $(STAMP) ## run the test suite (what CI runs) but `heavy` tests, TEST_WORKERS processes by file
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not heavy" $(ARGS)

test-heavy: $(STAMP) ## the `heavy` tests: ResNet50V2, DenseNet121, EfficientNetB0 end to end (~12 min)
	$(PY) -m pytest -m heavy $(ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check qat tests

bench: $(STAMP) ## benchmarks -> bench.json
	$(PY) -m qat.bench --out bench.json $(ARGS)

tensorboard: $(STAMP) ## open TensorBoard on runs/
	$(VENV)/bin/tensorboard --logdir runs

clean: ## remove generated runs and caches (keeps .venv)
	rm -rf runs outputs multirun bench.json .pytest_cache

EXPERIMENT_MODELS := convnet resnet mobilenet
experiments: $(STAMP) ## float/PTQ/QAT (params, fold) x w8/w4 for every model -> experiments/RESULTS.md
	for m in $(EXPERIMENT_MODELS); do \
	  $(PY) -m qat.train +experiment=$$m phase=float trainer.verbose=0 run.overwrite=true && \
	  $(PY) -m qat.train -m +experiment=$$m phase=quant quant.bn=params,fold \
	    quant.weight_bits=8,4 quant.init_from=runs/exp_$$m/float trainer.verbose=0 \
	    run.overwrite=true hydra.sweep.dir=runs/exp_$$m/sweep || exit 1; \
	done
	$(PY) -m qat.report $(addprefix runs/exp_,$(EXPERIMENT_MODELS)) \
	  --out experiments/RESULTS.md --plot experiments/results.png

coverage: $(STAMP) ## keras.applications through qat and tfmot -> experiments/COVERAGE.md (slow)
	$(PY) -m qat.coverage --out experiments/COVERAGE.md $(ARGS)
