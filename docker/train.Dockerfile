# The training box: torch (CUDA) + potstill. Build from the repository root:
#   docker build -f docker/train.Dockerfile -t potstill-train .
# Run on one GPU:
#   docker run --gpus all -v /data:/data potstill-train \
#     train --store /data/run1.store --student /data/student-init --out /data/student
# Several GPUs (torchrun inside the container):
#   docker run --gpus all --ipc=host -v /data:/data --entrypoint torchrun potstill-train \
#     --nproc-per-node 8 -m cli.main train --store /data/run1.store --student /data/student-init --out /data/student
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /opt/potstill
COPY pyproject.toml README.md ./
COPY store ./store
COPY teacher_gen ./teacher_gen
COPY student_train ./student_train
COPY cli ./cli
RUN pip install --no-cache-dir ".[s3,gcs]"

ENTRYPOINT ["potstill"]
CMD ["--help"]
