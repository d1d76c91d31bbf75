# fewstep on a GPU node: the package and the shipped zoo on a CUDA PyTorch image, `fewstep serve` as the
# entrypoint, running as a non-root user. docs/deploy.md has the whole story.
#
#   docker build -t fewstep .
#   docker run --gpus all -p 8000:8000 fewstep                              # serves the shipped zoo
#   docker run --gpus all -p 8000:8000 -v $PWD/my-zoo:/models:ro fewstep    # serves your checkpoints
#   docker run --gpus all -p 8000:8000 fewstep --max-batch 16 --api-key KEY  # flags go to `fewstep serve`
#
# The base image's CUDA torch (with its triton, for the kernels) satisfies the package's torch requirement,
# so `pip install .` adds only the pure-Python dependencies.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

LABEL org.opencontainers.image.title="fewstep" \
      org.opencontainers.image.description="1-4-step distilled text-to-image models with teacher fallback" \
      org.opencontainers.image.licenses="Apache-2.0"

# settings are FEWSTEP_* variables (docs/api.md); models are read from /models (mount your own there)
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FEWSTEP_HOST=0.0.0.0 FEWSTEP_PORT=8000 FEWSTEP_MODELS=/models \
    FEWSTEP_DEVICE=auto FEWSTEP_KERNELS=auto

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fewstep ./fewstep
COPY models ./models
COPY kernels ./kernels
COPY training ./training
COPY server ./server
COPY clients ./clients
RUN pip install --no-cache-dir . && rm -rf /app/build
COPY zoo /models

# a fixed numeric uid, so volume permissions and runAsNonRoot (deploy/kubernetes) can name it
RUN useradd --create-home --uid 10001 --user-group fewstep
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "fewstep.server.healthcheck"]
ENTRYPOINT ["fewstep", "serve"]
