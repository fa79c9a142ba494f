# syntax=docker/dockerfile:1
# The Millrace scorer with ONNX Runtime's CUDA and TensorRT execution providers. The base is
# NVIDIA's CUDA runtime with cuDNN (the libraries the onnxruntime-gpu wheel links against);
# TensorRT comes from NVIDIA's PyPI wheels. The scorer is built with the `cuda` and
# `tensorrt` features and still falls back to CPU when no GPU is visible.
#
# Not built by `make images`: the CUDA base image is on NVIDIA's registry and the GPU wheels
# are several GiB, neither of which a 2-core CI box without a GPU can use.
#
#   docker build -f images/scorer-gpu.Dockerfile -t ghcr.io/millrace-dev/millrace-scorer-gpu:0.1.0 .

ARG ONNXRUNTIME_VERSION=1.31.1
ARG TENSORRT_VERSION=10.16.1.11

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p millrace-scorer --bin millrace-scorer --features cuda,tensorrt \
    && install -D -m 0755 target/release/millrace-scorer /out/millrace-scorer

FROM nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_VERSION
ARG TENSORRT_VERSION
LABEL org.opencontainers.image.title="millrace-scorer-gpu" \
      org.opencontainers.image.description="Millrace scorer with the CUDA and TensorRT execution providers" \
      org.opencontainers.image.source="https://github.com/millrace-dev/millrace" \
      org.opencontainers.image.licenses="Apache-2.0"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip ca-certificates \
    && pip install --no-cache-dir --break-system-packages --target /opt/ort \
       "onnxruntime-gpu==${ONNXRUNTIME_VERSION}" "tensorrt-cu12-libs==${TENSORRT_VERSION}" \
    && apt-get purge -y python3-pip && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/millrace-scorer /usr/local/bin/millrace-scorer
ENV ORT_DYLIB_PATH=/opt/ort/onnxruntime/capi/libonnxruntime.so.${ONNXRUNTIME_VERSION} \
    LD_LIBRARY_PATH=/opt/ort/onnxruntime/capi:/opt/ort/tensorrt_libs
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/millrace-scorer"]
