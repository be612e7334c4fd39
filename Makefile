# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DIGITS := examples/data/digits.csv
DIGIT_IMAGES := examples/data/digits-images
DIABETES := examples/data/diabetes.csv

.PHONY: setup demo test clean prometheus examples federated

setup: $(STAMP)

# torch first and pinned: the CPU wheel of 2.13 is what we test on; a looser pin pulled in
# transitively can fetch a multi-GB CUDA build instead.
$(STAMP): pyproject.toml package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.*"
	$(PY) -m pip install --quiet -e '.[dev]'
	npm ci --no-audit --no-fund --loglevel=error   # anvil, the local dev chain (package-lock.json)
	touch $(STAMP)

# The example datasets: generated from data that ships with scikit-learn (no download), never committed.
examples: $(DIGITS) $(DIGIT_IMAGES) $(DIABETES)

$(DIGITS): | $(STAMP)
	$(PY) scripts/make_digits_csv.py --out $(DIGITS)

# written to a temporary folder and renamed, so an interrupted run leaves no half folder behind
$(DIGIT_IMAGES): | $(STAMP)
	rm -rf $(DIGIT_IMAGES).tmp
	$(PY) scripts/make_digits_images.py --out $(DIGIT_IMAGES).tmp
	mv $(DIGIT_IMAGES).tmp $(DIGIT_IMAGES)

$(DIABETES): | $(STAMP)
	$(PY) scripts/make_diabetes_csv.py --out $(DIABETES)

# a federated job: two data owners keep their halves of the digits, DP-SGD and secure aggregation
federated: $(STAMP)
	$(PY) scripts/local_swarm.py --owners 2 --peers 1 --job examples/federated-digits.yaml --out out/federated

demo: $(STAMP) $(DIGITS)
	$(PY) scripts/local_swarm.py --peers 3 --job examples/digits-mlp.yaml --out out/demo

test: $(STAMP) prometheus
	$(PY) -m pytest

# The Prometheus integration test scrapes a real server: Debian's package, installed when we are
# root; otherwise that one test is skipped with its reason.
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	  >/dev/null; } || echo "prometheus is not installed: its integration test will be skipped"

clean:
	rm -rf out .pytest_cache
