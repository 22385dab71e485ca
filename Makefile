# vla — set-up, tests and curricula. Targets are files (stamps and manifests), so `make`
# reruns only what is missing or stale and an interrupted curriculum resumes where it stopped.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLA := $(BIN)/vla
STAMP := $(VENV)/.vla-installed

# Offline by default: the embedded world needs no network; real models must be on disk.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export YOLO_OFFLINE ?= 1
export YOLO_CONFIG_DIR ?= $(CURDIR)/.yolo

.PHONY: install test test-fast bench clean help
help:
	@echo "make install   create .venv with everything vla needs"
	@echo "make test      install (if needed) and run the test suite (offline, CPU)"
	@echo "make proclip   the ProCLIP curriculum on the embedded synthetic world"
	@echo "make bench     throughput / cache / retrieval-eval benchmarks"

install: $(STAMP)

# torch 2.14.1 pairs with torchvision 0.29.1 on these machines (see ../shared/DESIGN.md);
# opencv-contrib-python-headless must come after ultralytics' opencv-python (same cv2 folder).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,embedders,logging]'
	$(BIN)/pip install -q opencv-contrib-python-headless
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs data bench .yolo
