# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo_out

.PHONY: install demo test bench clean

install: $(STAMP)

# torch/torchvision are pinned to the wheels this project is tested with;
# they are installed first so the project install does not pull another build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on bundled photos: discover wholes/parts/subparts (the paper recipe,
# pseudo-labels and overlays to look at), index the regions of the search recipe
# (every region of the merge hierarchy, no CRF: the index build's default), then
# search with a box around the front wheel of one view of a motorcycle.
# The overlays use finer thresholds than the default (0.6,0.5,0.4) so that wheels
# become masks of their own (README: "Thresholds").
demo: $(STAMP)
	$(BIN)/python -c "from hassod.samples import write_samples; write_samples('$(DEMO)/samples')"
	$(BIN)/hassod discover $(DEMO)/samples --out $(DEMO)/pseudo.json --viz $(DEMO)/viz --thresholds 0.7,0.6,0.5
	$(BIN)/hassod index build $(DEMO)/samples --index $(DEMO)/index --recipe search
	$(BIN)/hassod index stats $(DEMO)/index
	$(BIN)/hassod search --index $(DEMO)/index --query $(DEMO)/samples/motorcycle_left.png \
		--box 505,290,690,455 -k 5 --html $(DEMO)/search.html
	@echo "index: $(DEMO)/index  results page: $(DEMO)/search.html  pseudo-labels: $(DEMO)/pseudo.json  overlays: $(DEMO)/viz/"
	@echo "see every region and click one to search: $(BIN)/hassod serve --index $(DEMO)/index, then open http://127.0.0.1:8000/"

test: $(STAMP)
	bash .ci/install_postgres.sh
	bash .ci/install_chromium.sh
	$(BIN)/pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_discover.py

clean:
	rm -rf $(DEMO) .pytest_cache
