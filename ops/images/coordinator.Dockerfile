# syntax=docker/dockerfile:1
# The kakehashi-coordinator image. Build from the repository root:
#   docker build -f ops/images/coordinator.Dockerfile -t kakehashi/coordinator:dev .
# Not built in CI (no container engine there); kept deliberately plain.

FROM rust:1.95-bookworm AS build
# etcd-client's build script needs protoc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kakehashi-coordinator --bin kakehashi-coordinator \
 && install -D target/release/kakehashi-coordinator /out/kakehashi-coordinator

# glibc and libgcc only, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kakehashi-coordinator /usr/local/bin/kakehashi-coordinator
USER 65532:65532
EXPOSE 7700 9090
ENTRYPOINT ["/usr/local/bin/kakehashi-coordinator"]
