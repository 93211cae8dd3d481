# syntax=docker/dockerfile:1
# The kakehashi-relay image. Build from the repository root:
#   docker build -f ops/images/relay.Dockerfile -t kakehashi/relay:dev .
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
    cargo build --release --locked -p kakehashi-relay --bin kakehashi-relay \
 && install -D target/release/kakehashi-relay /out/kakehashi-relay

# glibc and libgcc only, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kakehashi-relay /usr/local/bin/kakehashi-relay
USER 65532:65532
EXPOSE 4433/udp 4434 9090
ENTRYPOINT ["/usr/local/bin/kakehashi-relay"]
