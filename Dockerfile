# syntax=docker/dockerfile:1
# One image for the region node and the geo router (and the deployment's one-shot jobs):
#   python -m region_node           the node   (PAYCLUSTER_* settings, region_node/config.py)
#   python -m geo_router            the router (PAYCLUSTER_ROUTER_*, geo_router/config.py)
#   paycluster deploy <step>        migrations, certificates, wiring, WAN emulator, gateways
# ---------------------------------------------------------------- build: wheels into a venv
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/paycluster
WORKDIR /src
# Dependencies first, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p region_node replication lock_service geo_router channel cluster bench \
    && /opt/paycluster/bin/pip install --upgrade pip setuptools wheel \
    && /opt/paycluster/bin/pip install . \
    && /opt/paycluster/bin/pip uninstall -y paycluster
COPY region_node ./region_node
COPY replication ./replication
COPY lock_service ./lock_service
COPY geo_router ./geo_router
COPY channel ./channel
COPY cluster ./cluster
COPY bench ./bench
COPY paycluster ./paycluster
RUN /opt/paycluster/bin/pip install --no-deps . \
    && /opt/paycluster/bin/python -m compileall -q /opt/paycluster/lib

# ---------------------------------------------------------------- runtime: no compilers, no root
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="paycluster" \
      org.opencontainers.image.description="Multi-region payment cluster: region node and geo router" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid, so volumes (certificates, keys) prepared by one container are readable by
# the others, and Kubernetes-style runAsNonRoot checks can verify it numerically.
RUN groupadd --system --gid 10001 paycluster \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/paycluster \
       --shell /usr/sbin/nologin paycluster \
    && mkdir -p /var/lib/paycluster/pki /var/lib/paycluster/secrets /etc/paycluster \
    && chown -R 10001:10001 /var/lib/paycluster \
    && chmod 0700 /var/lib/paycluster/secrets
COPY --from=build /opt/paycluster /opt/paycluster
ENV PATH=/opt/paycluster/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PAYCLUSTER_API_HOST=0.0.0.0 \
    PAYCLUSTER_API_PORT=8000 \
    HEALTHCHECK_URL=http://127.0.0.1:8000/health/ready
WORKDIR /var/lib/paycluster
USER 10001:10001
EXPOSE 8000 9000
# Ready means routable: store, Redis, bus and replication SLO (degraded still answers 200).
# The router overrides HEALTHCHECK_URL with its admin port's /health/ready.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2)"]
CMD ["python", "-m", "region_node"]
