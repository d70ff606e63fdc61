# Set-up and the two jobs of README.md. `make demo` quantizes the embedded default model
# (`make demo MODEL=default-cnn`: another embedded model, into runs/demo-default-cnn);
# `make test` runs the test suite. Both create .venv and install everything on first use, at the
# exact versions of constraints.txt (pyproject.toml itself declares only ranges).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
MODEL ?= default
DEMO_OUT := runs/$(if $(filter default,$(MODEL)),demo,demo-$(MODEL))

.PHONY: setup data demo test train-default benchmark clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,distributed,export]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist, unless EVOLQ_FMNIST_DIR points elsewhere.
data:
	@if [ -n "$$EVOLQ_FMNIST_DIR" ] || [ -f $(FMNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
	       "or set EVOLQ_FMNIST_DIR to a folder with its *-ubyte.gz files"; exit 1; \
	fi

demo: setup
	$(BIN)/evolq quantize --model $(MODEL) --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

train-default: setup
	$(BIN)/evolq train-default --model $(MODEL)

benchmark: setup
	$(BIN)/python benchmarks/objective.py

clean:
	rm -rf $(VENV) runs .pytest_cache
