# The sidecar daemon as a container image. Build: `docker build -t sidecar .` (docs/deploy.md).
# BASE_IMAGE: any Debian-like image with python3 (>= 3.11) and its venv module; both stages use
# it, so the virtualenv built in the first runs unchanged in the second.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# A build venv with pip makes the wheel; the runtime venv gets only that wheel and its
# dependencies (no pip, no setuptools, no sources). Behind a TLS-inspecting proxy, pass its CA
# bundle as a build secret (--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt): it
# is used by pip here and never stored in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python3 -m venv --without-pip /opt/sidecar \
    && /opt/build/bin/pip --python /opt/sidecar/bin/python install --no-cache-dir \
        --no-compile /wheels/sidecar-*.whl \
    && /opt/sidecar/bin/python -m compileall -q /opt/sidecar/lib

FROM ${BASE_IMAGE}
# A fixed uid/gid: service containers join group 10001 to reach the socket (mode 0660).
ARG SIDECAR_UID=10001
ARG SIDECAR_GID=10001
RUN groupadd --gid "${SIDECAR_GID}" sidecar \
    && useradd --uid "${SIDECAR_UID}" --gid sidecar --no-create-home \
        --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar \
    && install -d -o sidecar -g sidecar -m 0750 /run/sidecar /var/lib/sidecar
COPY --from=build /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production \
    SIDECAR_SOCKET=/run/sidecar/sidecar.sock \
    SIDECAR_STATE_DIR=/var/lib/sidecar
# The socket's folder is shared with the service containers; the state folder keeps the local
# store's files across container restarts.
VOLUME ["/run/sidecar", "/var/lib/sidecar"]
USER ${SIDECAR_UID}:${SIDECAR_GID}
# The daemon is PID 1 (exec form, no shell): SIGTERM drains, a second one exits at once.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["sidecar", "health"]
ENTRYPOINT ["sidecar", "serve"]
