# syntax=docker/dockerfile:1
# kip control plane image: build with the Rust toolchain, run on distroless (no shell, no
# package manager) as a non-root user. Build from the repository root:
#   docker build -f deploy/docker/control-plane.Dockerfile -t kip-control-plane .

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# ring needs a C compiler: the rust slim image ships gcc. The caches keep CI rebuilds fast.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kip-control-plane --bin kip-control-plane -p kipctl --bin kipctl \
    && install -D -m 0755 target/release/kip-control-plane /out/kip-control-plane \
    && install -D -m 0755 target/release/kipctl /out/kipctl

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="kip-control-plane" \
      org.opencontainers.image.description="kip control plane: fleet, PKI, sensor data, admin and LLM API" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/kip-control-plane /out/kipctl /usr/local/bin/
# distroless "nonroot" is uid/gid 65532; the Kubernetes manifests pin the same ids.
USER 65532:65532
ENV KIP_LISTEN_ADDR=0.0.0.0:8080 \
    KIP_AGENT_LISTEN_ADDR=0.0.0.0:8443 \
    KIP_LOG_FORMAT=json
EXPOSE 8080 8443
ENTRYPOINT ["/usr/local/bin/kip-control-plane"]
