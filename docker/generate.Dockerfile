# The GPU generation box: vLLM + potstill. Build from the repository root:
#   docker build -f docker/generate.Dockerfile -t potstill-generate .
# Run (mount the models and the output; pass S3 credentials as env vars when writing to s3://):
#   docker run --gpus all -v /models:/models -v /data:/data potstill-generate \
#     generate --teacher /models/teacher --backend vllm --prompts /data/prompts.jsonl --out /data/run1.store
# The image also serves generation jobs (`potstill serve`, port 8000):
#   docker run --gpus all -p 8000:8000 -e POTSTILL_TOKEN=... potstill-generate serve --teacher /models/teacher --host 0.0.0.0
FROM vllm/vllm-openai:v0.11.0

ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /opt/potstill
COPY pyproject.toml README.md ./
COPY store ./store
COPY teacher_gen ./teacher_gen
COPY student_train ./student_train
COPY cli ./cli
# vLLM's image already holds a CUDA torch that satisfies potstill's torch requirement.
RUN pip install --no-cache-dir ".[s3,gcs,serve]"

ENTRYPOINT ["potstill"]
CMD ["--help"]
