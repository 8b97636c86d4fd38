# The two commands of the README:
#   make train   set up, then a 2-process training run on CPU on the embedded sample corpus
#   make test    set up, then the default test suite
# Extra Hydra overrides go in ARGS, e.g. make train ARGS="train.steps=50".
PY      := .venv/bin/python
NPROC   ?= 2
ARGS    ?=

.PHONY: setup train test clean
setup: .venv/.quintet-installed

.venv/.quintet-installed: pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh
	touch $@

train: setup
	.venv/bin/torchrun --standalone --nproc-per-node $(NPROC) -m launch.train $(ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv runs outputs .pytest_cache
