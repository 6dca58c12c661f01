# syntax=docker/dockerfile:1
# The credits service. Build context: the repository root.

# Build: the wheel, and the runtime dependencies exactly as uv.lock pins them (with hashes).
FROM python:3.11-slim-bookworm AS build
ENV UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY requirements-uv.txt build-constraints.txt ./
RUN pip install --no-cache-dir --require-hashes -r requirements-uv.txt
COPY pyproject.toml uv.lock README.md ./
COPY app ./app
COPY lua ./lua
RUN uv build --wheel --build-constraints build-constraints.txt --require-hashes --out-dir /dist \
 && uv export --frozen --no-dev --no-emit-project --format pylock.toml -o /dist/pylock.toml

# Runtime: a venv with the wheel (no -e, no source tree) and its locked dependencies;
# uv and the wheel are mounted from the build stage, never copied into the image.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    UV_PYTHON_DOWNLOADS=never \
    PATH=/opt/venv/bin:$PATH
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    --mount=type=bind,from=build,source=/usr/local/bin/uv,target=/usr/local/bin/uv \
    uv venv /opt/venv \
 && uv pip install --python /opt/venv/bin/python --no-cache --compile-bytecode --no-deps \
      --require-hashes -r /dist/pylock.toml \
 && uv pip install --python /opt/venv/bin/python --no-cache --compile-bytecode --no-deps \
      /dist/ai_credits-*.whl \
 && uv pip check --python /opt/venv/bin/python \
 && useradd --system --uid 10001 credits
USER credits
WORKDIR /srv

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# Per worker: at most 1,200 connections and requests at once (CREDITS_STREAMS_MAX=1000
# usage streams plus 200 for everything else); idle keep-alive closed after 5 s.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--limit-concurrency", "1200", "--timeout-keep-alive", "5", "--backlog", "2048"]
