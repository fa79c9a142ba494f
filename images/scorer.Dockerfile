# syntax=docker/dockerfile:1
# The Millrace scorer (serve, batch, warm, fetch-model) with ONNX Runtime's CPU build, on a
# distroless base (glibc, libstdc++, CA certificates, a nonroot user). ONNX Runtime comes
# from the PyPI wheel the tests run against, loaded at run time through ORT_DYLIB_PATH.
# `make images` builds the same image without a Docker engine (scripts/images.sh).
#
#   docker build -f images/scorer.Dockerfile -t ghcr.io/millrace-dev/millrace-scorer:0.1.0 .

ARG ONNXRUNTIME_VERSION=1.31.1

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p millrace-scorer --bin millrace-scorer \
    && install -D -m 0755 target/release/millrace-scorer /out/millrace-scorer

FROM docker.io/library/python:3.12-slim-bookworm AS onnxruntime
ARG ONNXRUNTIME_VERSION
RUN pip install --no-cache-dir --no-deps --target /ort "onnxruntime==${ONNXRUNTIME_VERSION}" \
    && install -D -m 0644 /ort/onnxruntime/capi/libonnxruntime.so.${ONNXRUNTIME_VERSION} \
       /out/libonnxruntime.so.${ONNXRUNTIME_VERSION}

FROM gcr.io/distroless/cc-debian12:nonroot
ARG ONNXRUNTIME_VERSION
LABEL org.opencontainers.image.title="millrace-scorer" \
      org.opencontainers.image.description="Millrace scorer: hybrid batch + real-time ONNX inference (CPU)" \
      org.opencontainers.image.source="https://github.com/millrace-dev/millrace" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=onnxruntime /out/ /usr/local/lib/
COPY --from=build /out/millrace-scorer /usr/local/bin/millrace-scorer
ENV ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so.${ONNXRUNTIME_VERSION}
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/millrace-scorer"]
