# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   install, build the default pack, run the synthetic line end to end
#   make test   install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PACK ?= packs/default

.PHONY: install demo test test-all pack bench clean

$(BIN)/anomaly-edge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev,llm]'
	touch $@

install: $(BIN)/anomaly-edge

$(PACK)/pack.yaml: $(BIN)/anomaly-edge export/default_pack.py export/efficientnet_lite.py export/assets.py edge/pack.py
	$(BIN)/anomaly-edge export default --out $(PACK) --force

pack: $(PACK)/pack.yaml

demo: pack
	$(BIN)/anomaly-edge demo --pack $(PACK) --out demo-out

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

bench: pack
	$(BIN)/python bench/bench_scoring.py --pack $(PACK)

clean:
	rm -rf demo-out packs .pytest_cache
