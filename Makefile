# Two commands: `make run` serves on 127.0.0.1:8765, `make test` runs the whole suite.
# Both create .venv if it is missing and install the project into it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8765
# ONNX Runtime build: cpu, or gpu for onnxruntime-gpu (CUDA). Switching needs `make clean` first.
ORT    ?= cpu

.PHONY: run test install system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this takes the local CPU wheel; a loose range pulls CUDA builds.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(ORT),test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The `ray` extra (--inference ray), for the tests of the Ray Serve deployments; `make run` and
# the default install do without it.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(ORT),ray]'
	touch $(RAY_STAMP)

# Debian packages: PortAudio for the microphone client, espeak-ng for the speech the tests make,
# chromium for the browser tests (driven by Playwright; never `playwright install`), PostgreSQL
# and HAProxy for the scale-out tests (they start throwaway ones of their own: grym/cluster).
SYSTEM_PACKAGES := libportaudio2 espeak-ng chromium postgresql haproxy
# The training recipe's voices (festival and its English voices, flite's for --flite:
# models/training/synth.py) and the text its committed sentence lists were made from
# (models/training/sources.py: a test makes them again and compares).
TRAINING_PACKAGES := festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite \
	wordnet-base dict-gcide fortunes fortunes-min
# For `make image` and its test (tests/test_image.py): podman with the runc runtime, debootstrap
# for the image's base (docs/deployment.md, section 3).
IMAGE_PACKAGES := podman runc debootstrap
system-deps:
	@if ! command -v dpkg >/dev/null; then \
	  echo "not Debian: make sure PortAudio, espeak-ng and chromium are installed"; exit 0; fi; \
	missing=""; for p in $(SYSTEM_PACKAGES) $(TRAINING_PACKAGES) $(IMAGE_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "please run: sudo apt-get install$$missing"; exit 1; fi; \
	echo "installing$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

run: install
	$(VENV)/bin/grym-stream serve --host $(HOST) --port $(PORT)

# Two workers for most of the suite, then the tests that need the machine to themselves
# (tests/conftest.py: SERIAL) in one process.
test: install $(RAY_STAMP) system-deps
	$(PY) -m pytest -m "not serial"
	$(PY) -m pytest -m serial -n 0

# The server's container image, localhost/grym-stream:<version> (deploy/Containerfile), built
# with root podman from a debootstrapped Debian base and a wheelhouse: deploy/image.py.
.PHONY: image
image: install system-deps
	$(PY) deploy/image.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
