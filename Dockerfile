# The kcp image: `kcp serve`, `kcp agent` and the CLI. Built by compose/docker-compose.yml.
#   docker build -t kcp:local .   then   docker run --rm kcp:local --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml ./
COPY controlplane ./controlplane
COPY kernel_agent ./kernel_agent
# user syscall handlers (`kcp agent --handlers examples.infer_handlers`) import from here
COPY examples ./examples
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app kcp
ENV PYTHONPATH=/app

USER kcp
ENTRYPOINT ["kcp"]
CMD ["--help"]
