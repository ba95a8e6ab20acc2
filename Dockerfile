# trio-gateway: one process per container (scale out with replicas, not workers).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trio_gateway ./trio_gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER gateway
ENV GATEWAY__HOST=0.0.0.0 \
    GATEWAY__PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"GATEWAY__PORT\", \"8000\")}/health', timeout=2)"
# Exec form: SIGTERM reaches trio-gateway directly, so the graceful drain runs.
ENTRYPOINT ["trio-gateway"]
CMD ["serve"]
