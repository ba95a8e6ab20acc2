# trio-gateway: one process per container (scale out with replicas, not workers).
#
# Two stages: the build stage installs the project and its locked dependencies into a virtualenv
# (pip, setuptools and the build tree stay behind); the final stage is the slim base plus that
# virtualenv. Both stages use the same base so the venv's interpreter path is valid in both.
# tests/tools/test_packaging.py parses this file and runs its COPY, install and start commands in a
# fresh virtualenv (no Docker engine is needed for that); keep them plain.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/lock.txt ./requirements/lock.txt
COPY trio_gateway ./trio_gateway
# The project from its own metadata (pyproject.toml), every dependency at the version the lock
# file pins (-c constrains without installing the test/dev extras). Then pip, setuptools and
# wheel leave the venv: the final image installs nothing at run time, and a package manager in
# it is only attack surface (tests/proof/test_containers.py checks they are gone).
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir -c requirements/lock.txt . \
    && "$VIRTUAL_ENV/bin/pip" uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 --user-group gateway \
    && mkdir -p /var/lib/trio-gateway \
    && chown gateway:gateway /var/lib/trio-gateway \
    && chmod 0700 /var/lib/trio-gateway
COPY --from=build /opt/venv /opt/venv
# /var/lib/trio-gateway exists (owned by the user) so that a volume mounted there starts with
# that owner: the SQLite state file and the dev issuer's key file live in it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRIO_GATEWAY_DEV_ISSUER_FILE=/var/lib/trio-gateway/dev-issuer.json \
    GATEWAY__SQLITE_PATH=/var/lib/trio-gateway/trio-gateway.sqlite3 \
    GATEWAY__HOST=0.0.0.0 \
    GATEWAY__PORT=8000 \
    GATEWAY__LOG_FORMAT=json
# The gateway's state (session owners, in SQLite) and the dev issuer's key live here: a volume,
# so they outlive the container and stay writable under --read-only. Mount a named volume to
# keep them across re-creation (docker-compose.yml does).
VOLUME ["/var/lib/trio-gateway"]
USER gateway
WORKDIR /home/gateway
# No EXPOSE: the port is configuration (GATEWAY__PORT for the gateway, --port for the dev-issuer
# and demo-runtime commands the compose file runs from this same image), so an image-wide
# "8000/tcp" would be wrong for every other command; docker-compose.yml declares each
# service's port.
# Liveness only (/health never touches the runtime): a gateway whose runtime is down is still
# alive, and restarting it would not help. python + urllib because the slim image has no curl.
# The user agent trio-gateway-healthcheck keeps the probe's 200s out of the access log (one
# line every 10 s otherwise); a failing probe is still logged.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen(r.Request('http://127.0.0.1:' + os.environ.get('GATEWAY__PORT', '8000') + '/health', headers={'User-Agent': 'trio-gateway-healthcheck'}), timeout=2)"]
# Exec form, no shell and no wrapper: trio-gateway is PID 1 and receives SIGTERM itself, so the
# graceful drain runs (it installs its own SIGTERM/SIGINT handlers, which PID 1 needs).
CMD ["trio-gateway", "serve"]
