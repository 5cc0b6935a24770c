# The two commands of the README's quick start. Both build .venv first (idempotent).
PY := .venv/bin/python

.PHONY: setup train test bench bench-preprocess clean-data
setup: .venv/.ok
.venv/.ok: scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	touch $@

train: setup            ## default run: full tables on built-in synthetic Criteo-shaped data
	$(PY) -m dlrm.train $(ARGS)

test: setup             ## the whole CPU test suite (a few minutes on 2 cores)
	$(PY) -m pytest tests $(ARGS)

bench: setup            ## step-time benchmark (see docs/benchmarks.md)
	$(PY) scripts/bench.py $(ARGS)

bench-preprocess: setup  ## preprocessing throughput on synthetic Criteo text
	$(PY) scripts/bench_preprocess.py $(ARGS)

clean-data:             ## remove generated datasets (they are regenerated on first use)
	rm -rf data/synthetic-*
