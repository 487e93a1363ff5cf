# Convenience targets; the README's two commands are the source of truth.
PY := .venv/bin/python

.PHONY: setup demo test bench clean
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/emostream demo
test:
	$(PY) -m pytest
bench:
	$(PY) bench/model_bench.py
clean:
	rm -rf .venv build *.egg-info .pytest_cache
