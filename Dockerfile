# syntax=docker/dockerfile:1
# Build stage: a release binary from the locked dependency set.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tether

# Runtime stage: Debian slim, non-root, only the binary and the container
# config (config/docker.toml: TETHER_COOKIE_KEY, TETHER_WORKERS_DNS and
# TETHER_STORE come from the environment).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tether --create-home tether
COPY --from=build /src/target/release/tether /usr/local/bin/tether
COPY config/docker.toml /etc/tether/tether.toml
USER tether
WORKDIR /var/lib/tether
EXPOSE 8080 8443 9900
# The admin listener binds 0.0.0.0:9900 in config/docker.toml, so this check
# and the orchestrator's probes reach /healthz and /readyz.
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9900/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["--config", "/etc/tether/tether.toml"]
