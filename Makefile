# cxr-node: `make demo` and `make test` are the whole setup on a fresh machine.
# Both create .venv in the repository root as needed (pip, not uv/poetry: torch comes from local disk).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-all lint demo viewer bench clean install-service gpu-kit

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install cxr-node with its test tools

test: install  ## run the default test suite (slow and GPU tests are skipped)
	$(BIN)/python -m pytest

test-all: install  ## run every test, slow ones included (GPU tests need a CUDA device)
	$(BIN)/python -m pytest -m 'not gpu'

lint: install  ## ruff (lint and format), mypy --strict and the layer contracts of DESIGN.md §3
	$(BIN)/ruff check cxr_node tests bench
	$(BIN)/ruff format --check cxr_node tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

demo: install  ## start the node on loopback, send it chest images as a PACS would, print what happened
	$(BIN)/python -m cxr_node demo

viewer:  ## after `make demo`: Orthanc with DICOMweb holding demo-output/, OHIF on http://127.0.0.1:3000 (tools/viewer.py)
	$(PYTHON) tools/viewer.py --demo-output demo-output $(if $(PORT),--port $(PORT))

bench: install  ## receive vs DCMTK storescp, inference throughput, end-to-end turnaround (tables on stdout)
	$(BIN)/python bench/receive.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/e2e.py --n 100

clean:
	rm -rf $(VENV) demo-output bench/out .pytest_cache

install-service:  ## as root: install the systemd service (/opt/cxr-node, /etc/cxr-node); GPU=1 adds the NVIDIA drop-in
	GPU='$(GPU)' DESTDIR='$(DESTDIR)' bash systemd/install.sh

GPU_PYTHON ?= 3.12
GPU_PLATFORMS := $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64

gpu-kit: install  ## .gpu/: wheels (for GPU_PYTHON) and radiographs that bench/gpu/check.sh needs on a GPU machine
	rm -rf .gpu && mkdir -p .gpu/data
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(GPU_PLATFORMS) -d .gpu/wheels -r bench/gpu/wheels.txt
	$(BIN)/python -c 'import data_store, pathlib, shutil; d = pathlib.Path(data_store.__file__).parent / "data"; \
		[shutil.copy(d / f, ".gpu/data") for f in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm")]'
	du -sh .gpu
