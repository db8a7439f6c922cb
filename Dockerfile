# tokenferry: one image for both services.
#   docker run IMAGE                      -> the supervisor proxy (default CMD below)
#   docker run IMAGE gateway --listen ... -> the gateway
# See docs/deployment.md for how to build, run and deploy it.

# ---- builder: build tokenferry and install it with its dependencies into a venv ----
# Both stages use the same base: the venv copied between them points at its interpreter.
FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The venv lives at the same path in both stages, so its scripts' shebangs and its
# pyvenv.cfg (pointing at the same /usr/local/bin/python3.12) stay valid after the copy.
RUN python -m venv /opt/tokenferry

WORKDIR /src
# Only what the wheel needs (the .dockerignore keeps .venv, .git and tests out of the context).
COPY pyproject.toml README.md ./
COPY tokenferry/ tokenferry/
COPY proxy/ proxy/
COPY addons/ addons/
COPY gateway/ gateway/
COPY gateway_client/ gateway_client/

# A regular (non-editable) install: the wheel is built here and the source tree stays
# behind in this stage. Every compiled dependency comes as a manylinux wheel, so no
# compiler is needed here either; pip byte-compiles everything at install time, which
# matters because the runtime root filesystem is read-only.
RUN /opt/tokenferry/bin/pip install --no-cache-dir /src \
    && /opt/tokenferry/bin/tokenferry --help > /dev/null

# ---- runtime: the slim base image, the venv, an unprivileged user; no build tools ----
FROM python:3.12-slim AS runtime

LABEL org.opencontainers.image.title="tokenferry" \
      org.opencontainers.image.description="Supervisor proxy and gateway injecting short-lived, user-and-agent-scoped OAuth tokens into sandbox egress" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it and volumes can be
# prepared for it (fsGroup). No login shell and no home directory in the image.
RUN groupadd --system --gid 10001 tokenferry \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /var/lib/tokenferry --no-create-home --shell /usr/sbin/nologin tokenferry \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/tokenferry

COPY --from=builder /opt/tokenferry /opt/tokenferry

ENV PATH=/opt/tokenferry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/tokenferry

# The proxy's confdir (its CA certificate and private key) or the gateway's SQLite
# database: state that must outlive the container and must not sit in a layer.
VOLUME ["/var/lib/tokenferry"]
WORKDIR /var/lib/tokenferry

USER 10001:10001

# 8080: the proxy (sandboxes point HTTPS_PROXY here); 8443: the gateway API;
# 9464: the admin listener (/healthz, /metrics) of either service.
EXPOSE 8080 8443 9464

# No curl in the slim image: the interpreter is enough. The proxy handler is emptied so
# an HTTP(S)_PROXY set in the container's environment never routes the check elsewhere.
# Override TOKENFERRY_HEALTHCHECK_URL when the admin listener is moved.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get('TOKENFERRY_HEALTHCHECK_URL', 'http://127.0.0.1:9464/healthz'), timeout=4)"]

ENTRYPOINT ["tokenferry"]
CMD ["proxy", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9464", "--confdir", "/var/lib/tokenferry"]
