# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   install, build the default pack, run the synthetic line end to end
#   make test   install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PACK ?= packs/default

.PHONY: install demo test test-all pack bench run clean

# llama-cpp-python is built first, portably (scripts/build-llama-cpp.sh: no -march=native, no AMX or
# AVX-512), so that pip never builds or reuses a native one that dies with SIGILL on another CPU.
$(BIN)/anomaly-edge: pyproject.toml scripts/build-llama-cpp.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	scripts/build-llama-cpp.sh $(VENV)
	$(BIN)/pip install --quiet -e '.[cpu,export,dev,llm,plc,server]'
	touch $@

install: $(BIN)/anomaly-edge

$(PACK)/pack.yaml: $(BIN)/anomaly-edge export/default_pack.py export/efficientnet_lite.py export/backbone_nets.py export/assets.py edge/pack.py
	$(BIN)/anomaly-edge export default --out $(PACK) --force

pack: $(PACK)/pack.yaml

demo: pack
	$(BIN)/anomaly-edge demo --pack $(PACK) --out demo-out

# The synthetic station of configs/station.yaml: 16 good synthetic parts enrolled once.
stations/station-1/state/state.yaml: $(PACK)/pack.yaml
	rm -rf stations/station-1/state
	$(BIN)/anomaly-edge enroll --pack $(PACK) --synthetic 16 --out stations/station-1/state --quiet

# The line service on the synthetic line (MQTT to localhost:1883: apt-get install mosquitto).
run: stations/station-1/state/state.yaml
	$(BIN)/anomaly-edge run --config configs/station.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

bench: pack
	$(BIN)/python bench/bench_scoring.py --pack $(PACK)

clean:
	rm -rf demo-out packs stations var .pytest_cache
