# The GPU generation box: vLLM + potstill. Build from the repository root:
#   docker build -f docker/generate.Dockerfile -t potstill-generate .
# It runs as the unprivileged user `potstill` (uid 10001; --build-arg POTSTILL_UID=$(id -u) to use
# yours). Mounted folders it writes (stores, --state) must be writable by that uid, e.g.
#   sudo chown -R 10001:10001 /data/out /srv/potstill-state
# Run (mount the models and the output; pass S3 credentials as env vars when writing to s3://):
#   docker run --gpus all --ipc=host -v /models:/models:ro -v /data:/data potstill-generate \
#     generate --teacher /models/teacher --backend vllm --prompts /data/prompts.jsonl --out /data/run1.store
# The image also serves generation jobs (`potstill serve`, port 8000); its HEALTHCHECK asks the
# service's /health (with $POTSTILL_TOKEN when set), and is healthy while a batch job runs:
#   docker run --gpus all --ipc=host -p 8000:8000 -e POTSTILL_TOKEN -v /models:/models:ro -v /data:/data \
#     -v /srv/potstill-state:/state potstill-generate \
#     serve --teacher /models/teacher --host 0.0.0.0 --state /state --data-root /data
# The base is the vLLM release the vLLM tests ran with; docker/constraints-generate.txt pins every
# other dependency to the version those tests ran with.
FROM vllm/vllm-openai:v0.32.0

ARG POTSTILL_UID=10001
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/potstill
COPY pyproject.toml README.md ./
COPY docker/constraints-generate.txt ./constraints.txt
COPY docker/healthcheck.py ./healthcheck.py
COPY store ./store
COPY teacher_gen ./teacher_gen
COPY student_train ./student_train
COPY cli ./cli
COPY potstill ./potstill
# vLLM's image already holds a CUDA torch that satisfies potstill's torch requirement.
RUN pip install --no-cache-dir -c constraints.txt ".[s3,gcs,serve]"

# Installed as root, run as `potstill`: a job can write only where this user may. /data and /state
# are owned by it, so named volumes mounted there start writable; its home holds the caches
# (Hugging Face, torch.compile, Triton).
RUN useradd --uid "${POTSTILL_UID}" --user-group --create-home --home-dir /home/potstill --shell /usr/sbin/nologin potstill \
 && mkdir -p /data /state \
 && chown potstill:potstill /data /state
ENV HOME=/home/potstill
USER potstill
WORKDIR /home/potstill

# Loading a large teacher takes minutes; /health answers `loading` meanwhile, which counts as healthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/potstill/healthcheck.py"]

ENTRYPOINT ["potstill"]
CMD ["--help"]
