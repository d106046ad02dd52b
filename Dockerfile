# syntax=docker/dockerfile:1
# The stampede node image: `docker build -t stampede:0.1.0 .` at the repository root.
# Two stages: the release binary is built in the Rust image, then copied alone into a
# slim Debian with a non-root user. docs/kubernetes.md says how to use it.

# The toolchain the project is built and tested with (rust-version in Cargo.toml is the
# oldest that compiles it).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied
# out of the cache so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p stampede --bin stampede \
    && cp target/release/stampede /usr/local/bin/stampede

FROM debian:bookworm-slim
# The binary needs only libc and libgcc_s (TLS roots are compiled in), both in the base
# image; bash there runs the health check.
RUN groupadd --system --gid 10001 stampede \
    && useradd --system --uid 10001 --gid stampede --home-dir /var/lib/stampede \
       --shell /usr/sbin/nologin stampede \
    && install -d -o stampede -g stampede -m 0700 /var/lib/stampede
COPY --from=build /usr/local/bin/stampede /usr/local/bin/stampede
COPY deploy/docker/stampede-health /usr/local/bin/stampede-health

USER 10001:10001
# The node and the CLI (`docker exec ... stampede peers`) both find the data dir here.
ENV STAMPEDE_DATA_DIR=/var/lib/stampede
# Identity, control.json and run results: keep them across container restarts.
VOLUME ["/var/lib/stampede"]
# The mesh port; status HTTP (7401) and control stay on the container's loopback.
EXPOSE 7400/tcp
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["stampede-health"]
# Arguments after the image name are the node's flags, e.g. `--key-file FILE`.
ENTRYPOINT ["stampede", "node"]
