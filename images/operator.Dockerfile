# syntax=docker/dockerfile:1
# The Millrace operator: a static-enough Rust binary on a distroless base (glibc, CA
# certificates, a nonroot user), nothing else. `make images` builds the same image without a
# Docker engine (scripts/images.sh); this file is for registries' CI.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/millrace-dev/millrace-operator:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p millrace-operator --bin millrace-operator \
    && install -D -m 0755 target/release/millrace-operator /out/millrace-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="millrace-operator" \
      org.opencontainers.image.description="Reconciles millrace.dev InferenceDeployments" \
      org.opencontainers.image.source="https://github.com/millrace-dev/millrace" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/millrace-operator /usr/local/bin/millrace-operator
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/millrace-operator"]
