# flashrun: `make demo` sets up .venv and runs a 4-worker demo job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch; on a GPU machine override it, e.g. `make TORCH_SPEC='torch==2.13.0' test`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PROTO_OUT := flashrun/_proto
PROTO_STAMP := $(PROTO_OUT)/flashrun_pb2.py

.PHONY: venv proto demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The only place generated gRPC code comes from.
$(PROTO_STAMP): protos/flashrun.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) protos/flashrun.proto
	# protoc emits a top-level import; make it package-relative.
	sed -i 's/^import flashrun_pb2 as/from . import flashrun_pb2 as/' $(PROTO_OUT)/flashrun_pb2_grpc.py

proto: $(PROTO_STAMP)

demo: $(PROTO_STAMP)
	$(VENV)/bin/flashrun --standalone --nproc-per-node 4 --allow-inject scripts/examples/train_ddp.py --steps 200 \
		--step-time 0.05

test: $(PROTO_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/*_pb2*.pyi
