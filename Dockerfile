# The studio's image: the web app, the workers, beat and the CLI all run from it.
#
# PyTorch comes first, from the index named by build arguments, because the right build depends on
# the machine: the default is the small CPU build (enough for the web app, beat and the CPU queue,
# which never use a GPU). GPU workers need a CUDA build, for example:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t studio-gpu .
#
# docker-compose.yml builds both variants (see its x-build-gpu anchor).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    STUDIO_VAR_DIR=/app/var

# libglib2.0-0: OpenCV's face detector (headless build) links against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 studio

WORKDIR /app

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies in their own layer: code changes do not reinstall them. The package folders are
# stubs here; "compat" editable mode puts /app on sys.path, so the real code copied below is used.
COPY pyproject.toml README.md ./
RUN mkdir app worker \
    && touch app/__init__.py worker/__init__.py \
    && pip install -e . --config-settings editable_mode=compat

COPY alembic.ini ./
COPY migrations ./migrations
COPY templates ./templates
COPY worker ./worker
COPY app ./app

RUN mkdir -p /app/var /models && chown -R studio:studio /app/var /models
USER studio

EXPOSE 8000
CMD ["studio", "web", "--host", "0.0.0.0", "--port", "8000"]
