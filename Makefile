# The two commands of the README.  Each does its own set-up on a fresh machine: a .venv with a CPU torch
# (pinned to the torch 2.13.0 wheel this machine image ships; pyproject.toml states the supported range)
# and ckptcheck with its dev extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
JOBS   ?= 2
CFG    := fixtures/configs

.PHONY: demo test test-fast fuzz fixtures reports clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	@echo "== 1. a good checkpoint: every check passes =="
	$(BIN)/pytest -p no:cacheprovider -q --ckpt fixtures/good/consolidated.pth --model-config $(CFG)/lingua_params.json
	@echo
	@echo "== 2. a broken checkpoint: NaN weights, a missing tensor, a wrong dtype (this run is meant to fail) =="
	@$(BIN)/pytest -p no:cacheprovider -q -rf --ckpt fixtures/broken/damaged.pth --model-config $(CFG)/lingua_params.json; \
	  status=$$?; if [ $$status -eq 1 ]; then echo "(exit status 1: the checks caught it)"; else exit $$status; fi

test: $(STAMP)
	$(BIN)/ruff check ckptcheck tests bench fixtures
	$(BIN)/pytest -n $(JOBS) tests

test-fast: $(STAMP)
	$(BIN)/ruff check ckptcheck tests bench fixtures
	$(BIN)/pytest -n $(JOBS) -m "not slow" tests

# A long fuzzing campaign: bit flips of every fixture format (CI runs 12 examples per format, this 1000) and the
# structure-aware fuzzer (CI runs 40 per format family, this 3000 for each of 7: 21,000 inputs), then the totals.
# Reproducers of contract breaks are saved under build/fuzz/ (CKPTCHECK_FUZZ_OUT).
fuzz: $(STAMP)
	rm -f build/fuzz/stats-*.json
	CKPTCHECK_FUZZ_EXAMPLES=$${CKPTCHECK_FUZZ_EXAMPLES:-1000} \
	  CKPTCHECK_FUZZ_STRUCTURED_EXAMPLES=$${CKPTCHECK_FUZZ_STRUCTURED_EXAMPLES:-3000} \
	  $(BIN)/pytest -n $(JOBS) tests/test_fuzz.py tests/test_fuzz_structured.py -p no:randomly; \
	  status=$$?; $(BIN)/python -m tests.fuzzing.summary; exit $$status

fixtures: $(STAMP)
	$(BIN)/python fixtures/make_fixtures.py

# Example reports from the fixtures, so a visitor sees what a report looks like.
reports: $(STAMP)
	for fmt in md html json; do \
	  $(BIN)/ckptcheck report fixtures/good/dcp --target lingua_resume -o reports/lingua_step_folder.$$fmt || exit 2; \
	  $(BIN)/ckptcheck report fixtures/broken/damaged.pth --model-config $(CFG)/lingua_params.json \
	    -o reports/damaged_checkpoint.$$fmt; [ $$? -le 1 ] || exit 2; \
	  $(BIN)/ckptcheck report fixtures/good/hf --model-config $(CFG)/lingua_params.json --target lingua_init \
	    -o reports/hf_folder_for_lingua.$$fmt; [ $$? -le 1 ] || exit 2; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
