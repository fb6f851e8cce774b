# syntax=docker/dockerfile:1
# One image for every tokenledger process: migrate, api, worker, beat and flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /uvx /bin/

RUN groupadd --system --gid 10001 tokenledger \
 && useradd --system --uid 10001 --gid tokenledger --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin tokenledger

WORKDIR /app

# Dependencies first, exactly as locked: this layer is reused until uv.lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project

# Then the project itself, installed as a wheel (not editable) into the same venv.
COPY src ./src
COPY migrations ./migrations
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
 && mkdir -p /app/var && chown tokenledger:tokenledger /app/var

ENV PATH=/app/.venv/bin:$PATH
WORKDIR /app/var
USER tokenledger:tokenledger

# api, flower, worker metrics
EXPOSE 8000 5555 9100
CMD ["tokenledger", "--help"]
