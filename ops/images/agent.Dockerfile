# syntax=docker/dockerfile:1
# The `kakehashi` participant CLI (host, view, ctl) and the load generator, for running
# `kakehashi ctl` or `kakehashi-loadtest` against a cluster from inside it; also the
# image of the chart's evidence sink (`kakehashi sink`, values `sink.image`). Build from
# the repository root:
#   docker build -f ops/images/agent.Dockerfile -t kakehashi/tools:dev .
# Not built in CI (no container engine there); kept deliberately plain.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kakehashi-agent --bin kakehashi \
 && cargo build --release --locked -p kakehashi-loadtest --bin kakehashi-loadtest \
 && install -D target/release/kakehashi /out/kakehashi \
 && install -D target/release/kakehashi-loadtest /out/kakehashi-loadtest

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kakehashi"]
