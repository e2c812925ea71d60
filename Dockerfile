# syntax=docker/dockerfile:1
# CPU image: multi-stage, dependencies cached in their own layer, non-root, no compiler at run time.
#   docker build -t semcache:cpu .
#   docker run -p 8080:8080 -v semcache-data:/data semcache:cpu

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && printf 'fn main() {}\n' > benches/eviction.rs && cp benches/eviction.rs benches/restart.rs \
    && cargo build --release --locked \
    && rm -rf src benches
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin semcache

# Optional: bake the model into the image (MODEL=bake) instead of fetching it into the PVC at first start.
FROM build AS model
ARG MODEL=fetch
RUN mkdir -p /models && if [ "$MODEL" = "bake" ]; then /src/target/release/semcache model fetch --model-dir /models; fi

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin semcache \
    && mkdir -p /data /models \
    && chown semcache:semcache /data /models
COPY --from=build /src/target/release/semcache /usr/local/bin/semcache
COPY --from=model --chown=semcache:semcache /models /models
USER 10001:10001
ENV SEMCACHE_ADDR=0.0.0.0:8080 \
    SEMCACHE_DATA_DIR=/data \
    SEMCACHE_MODEL_DIR=/models \
    SEMCACHE_LOG_FORMAT=json
# 9090: Envoy ext_proc (gRPC) when SEMCACHE_EXT_PROC_ADDR is set (the Kubernetes ConfigMap does).
EXPOSE 8080 9090
VOLUME ["/data"]
# Exec form: semcache is PID 1 and receives SIGTERM directly (drain, flush, exit 0).
ENTRYPOINT ["/usr/local/bin/semcache"]
CMD ["serve"]
