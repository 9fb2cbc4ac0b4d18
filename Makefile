# Thin wrappers: everything lives in dev.py, which needs only Python.
.PHONY: demo test
demo:
	python3 dev.py demo
test:
	python3 dev.py test
