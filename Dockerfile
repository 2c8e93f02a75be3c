# The gateway image: the same program `make run` starts, as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# With the otel extra: OTEL_TRACES_EXPORTER=otlp and an endpoint switch tracing on (docs/observability.md).
# DL3013 takes the extra for an unpinned package; its versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --prefix=/install '.[otel]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /install /usr/local
COPY config/gateway.toml /etc/mcp-gateway/gateway.toml
USER 10001
# 8081: the proxy (data plane); 8082: admin (/metrics, /healthz, /readyz).
EXPOSE 8081 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8082/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["mcp-gateway"]
CMD ["--config", "/etc/mcp-gateway/gateway.toml"]
