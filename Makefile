# `make demo` and `make test` install everything into .venv first (about 2 minutes the first time).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= edge,matcher,postgres,milvus,train,test,gpu
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false

.PHONY: install demo test bench results browser postgres
install: $(VENV)/.installed

# Every service's extra, the GPU flavour of ONNX Runtime (it runs on CPU too) and the test tools; a
# service's image installs only its own (pyproject.toml, deploy/docker/Dockerfile).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/crossview demo

# The web page tests drive Debian's chromium headless (CI runs as root on Debian).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# The PostgreSQL store tests start their own server from Debian's package (initdb + pg_ctl, no system service).
postgres:
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql)

test: install browser postgres
	$(VENV)/bin/ruff check crossview kernel edge matcher trainer tests bench
	$(PY) -m pytest -q

bench: install
	$(PY) bench/edge_bench.py
	$(PY) bench/matcher_bench.py
	$(PY) bench/cluster_bench.py --out docs/benchmarks.md
	$(PY) bench/train_bench.py --out docs/benchmarks.md
	$(PY) bench/watchlist_bench.py --out docs/benchmarks.md
	$(PY) bench/calibration_bench.py --out docs/benchmarks.md
	$(PY) bench/int8_bench.py --out docs/benchmarks.md
	$(PY) bench/migration_bench.py --out docs/benchmarks.md
	$(PY) bench/harvest_upload_bench.py --out docs/benchmarks.md

# The domain adaptation experiments on real footage (about 1.5 h on 2 CPU cores): docs/results.md.
results: install
	$(PY) bench/adapt_tud.py --out docs/results.md
	$(PY) bench/adapt_vtest.py --out docs/results.md
