# syntax=docker/dockerfile:1
# Build stage: a release binary from the locked dependency set.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tether

# Runtime stage: Debian slim, non-root, only the binary and the container
# config (config/docker.toml: TETHER_COOKIE_KEY, TETHER_WORKERS_DNS and
# TETHER_STORE come from the environment).
# curl is only for the HEALTHCHECK (plain HTTP: tether makes no outgoing TLS
# connection, so no CA bundle). Its version is pinned to bookworm's 7.88.1
# with any Debian security revision (a glob apt understands), so security
# fixes still land without a Dockerfile change.
# The user has fixed numeric ids (10001:10001): deploy/kubernetes runs the pod
# as runAsUser/runAsGroup 10001 with runAsNonRoot, which needs numbers.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends 'curl=7.88.1-10+deb12u*' \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tether --create-home tether
COPY --from=build /src/target/release/tether /usr/local/bin/tether
COPY config/docker.toml /etc/tether/tether.toml
USER 10001:10001
WORKDIR /var/lib/tether
EXPOSE 8080 8443 9900
# The admin listener binds 0.0.0.0:9900 in config/docker.toml, so this check
# and the orchestrator's probes reach /healthz and /readyz.
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9900/healthz"]
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["--config", "/etc/tether/tether.toml"]
