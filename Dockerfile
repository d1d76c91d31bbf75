# fewstep on a GPU node: the package, the shipped zoo, `fewstep serve` as the entrypoint.
# Build: docker build -t fewstep .   Run: docker run --gpus all -p 8000:8000 fewstep
# Mount your own models at /models: docker run --gpus all -v $PWD/my-zoo:/models -p 8000:8000 fewstep
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FEWSTEP_HOST=0.0.0.0 FEWSTEP_PORT=8000 FEWSTEP_MODELS=/models FEWSTEP_ZOO=/models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fewstep ./fewstep
COPY models ./models
COPY kernels ./kernels
COPY training ./training
COPY server ./server
COPY clients ./clients
# the base image's CUDA torch satisfies the torch requirement; nothing else pulls another torch
RUN pip install --no-cache-dir .
COPY zoo /models

RUN useradd --create-home --uid 10001 fewstep && chown -R fewstep /app
USER fewstep

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
ENTRYPOINT ["fewstep", "serve"]
