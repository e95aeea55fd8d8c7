# mnistq: one image for the API, the workers and the migration job.
# CPU build by default; the compose `gpu` profile builds it with CUDA wheels instead.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    MNISTQ_ARTIFACT_DIR=/artifacts \
    MNISTQ_DATA_DIR=/data \
    MNISTQ_VAR_DIR=/var/lib/mnistq

WORKDIR /app

# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install --index-url "$TORCH_INDEX_URL" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY api ./api
COPY worker ./worker
COPY client ./client
RUN pip install .

# Named volumes mounted on these folders inherit their owner on first use.
RUN useradd --create-home --uid 1000 mnistq \
    && mkdir -p /artifacts /data /var/lib/mnistq \
    && chown mnistq:mnistq /artifacts /data /var/lib/mnistq
USER mnistq

EXPOSE 8000
CMD ["mnistq", "api", "--host", "0.0.0.0", "--port", "8000"]
