# The training box: torch (CUDA) + potstill. Build from the repository root:
#   docker build -f docker/train.Dockerfile -t potstill-train .
# It runs as the unprivileged user `potstill` (uid 10001; --build-arg POTSTILL_UID=$(id -u) to use
# yours): the folders it writes (--out) must be writable by that uid, e.g.
#   sudo chown -R 10001:10001 /data/student
# --ipc=host gives the loader workers the shared memory their batches travel in (Docker's default
# /dev/shm is 64 MB). Run on one GPU:
#   docker run --gpus all --ipc=host -v /data:/data potstill-train \
#     train --store /data/run1.store --student /data/student-init --out /data/student
# Several GPUs (torchrun inside the container):
#   docker run --gpus all --ipc=host -v /data:/data --entrypoint torchrun potstill-train \
#     --nproc-per-node 8 -m potstill.cli.main train --store /data/run1.store --student /data/student-init --out /data/student
# docker/constraints-train.txt pins every dependency but torch to the version the tests ran with.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ARG POTSTILL_UID=10001
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/potstill
COPY pyproject.toml README.md ./
COPY docker/constraints-train.txt ./constraints.txt
COPY store ./store
COPY teacher_gen ./teacher_gen
COPY student_train ./student_train
COPY cli ./cli
COPY potstill ./potstill
RUN pip install --no-cache-dir -c constraints.txt ".[s3,gcs]"

# Installed as root, run as `potstill`; /data belongs to it, so a named volume mounted there starts
# writable; its home holds the caches (Hugging Face, Triton).
RUN useradd --uid "${POTSTILL_UID}" --user-group --create-home --home-dir /home/potstill --shell /usr/sbin/nologin potstill \
 && mkdir -p /data \
 && chown potstill:potstill /data
ENV HOME=/home/potstill
USER potstill
WORKDIR /home/potstill

# A training run is a batch job: no service, nothing to probe (Docker tracks whether it exits 0).
HEALTHCHECK NONE

ENTRYPOINT ["potstill"]
CMD ["--help"]
