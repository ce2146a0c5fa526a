# Set-up is part of every target: a fresh clone needs only Python 3.11+ and these commands.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo pictures test lint bench bench-serve models demo-calibration calibration-textures audit-example clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)  ## the sidecar on the demo model (gRPC :50051, metrics :9464) until Ctrl-C
	$(BIN)/guard serve

pictures: $(STAMP)  ## explain the bundled demo images, pictures in out/demo
	$(BIN)/guard demo --out out/demo

test: $(STAMP)  ## the test suite
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check guard tests benchmarks scripts deploy
	$(BIN)/ruff format --check guard tests benchmarks scripts deploy

bench: $(STAMP)  ## engine vs model-only floor vs rex-xai (installs rex-xai in its own venv)
	$(BIN)/python benchmarks/bench_engine.py --json benchmarks/results/latest.json

bench-serve: $(STAMP)  ## load test of the sidecar: sync/async x shared calls, 1/4/16 clients
	$(BIN)/python benchmarks/bench_serve.py --json benchmarks/results/serve.json

demo-calibration: $(STAMP)  ## re-make the demo model's shipped calibration from its held-out split
	$(BIN)/guard calibrate guard/demo/heldout.npz --out guard/demo/calibration.json \
		--report out/demo-calibration --restart
	rm -f guard/demo/calibration.json.cache.jsonl
	$(BIN)/python scripts/demo_calibration_summary.py --write

calibration-textures: $(STAMP)  ## calibrate the 64x64 texture CNN on corrupted held-out crops
	$(BIN)/python scripts/make_shifted_textures.py
	$(BIN)/guard calibrate benchmarks/models/textures_shifted.npz \
		--model benchmarks/models/textures_cnn.onnx --classes benchmarks/models/textures_classes.json \
		--out out/textures-calibration/calibration.json --report out/textures-calibration/report

audit-example: $(STAMP)  ## compare the three shapes models by their MPSs, report in out/audit-shapes
	$(BIN)/guard audit --model benchmarks/models/shapes_cnn.onnx \
		--model benchmarks/models/shapes_gapcnn.onnx --model benchmarks/models/shapes_cnn_small.onnx \
		--data benchmarks/models/shapes_heldout.npz --report out/audit-shapes

models: $(STAMP)  ## re-train the demo and benchmark models (needs the train extra: torch)
	$(BIN)/pip install --quiet -e '.[dev,train]'
	$(BIN)/python scripts/train_models.py

clean:
	rm -rf $(VENV) out benchmarks/results
