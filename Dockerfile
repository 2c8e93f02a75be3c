# The gateway image: the same program `make run` starts, in its compiled form, as a non-root user.
FROM python:3.11-slim AS build
# A C compiler for the compiled form: setup.py builds the data plane's modules with mypyc (docs/performance.md).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# mypyc checks the modules' types against the pinned dependencies: those and mypy first, then the build,
# which fails rather than fall back to pure Python (AENV_GATEWAY_COMPILE=1). The first is the project itself,
# its versions pinned in pyproject.toml (DL3013), and a layer of its own (DL3059). With the otel extra:
# OTEL_TRACES_EXPORTER=otlp and an endpoint switch tracing on (docs/observability.md).
# hadolint ignore=DL3013,DL3059
RUN pip install --no-cache-dir '.[compile,otel]'
# hadolint ignore=DL3059,DL3013
RUN AENV_GATEWAY_COMPILE=1 pip install --no-cache-dir --no-build-isolation --ignore-installed --prefix=/install '.[otel]'

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
