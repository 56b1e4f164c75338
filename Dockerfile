# Failgate: a small image with only runtime dependencies, running as a non-root user.
#   docker build -t failgate .
#   docker run -e FAILGATE_ADMIN_TOKEN=... -e REDIS_URL=redis://redis:6379/0 -p 8080:8080 -p 9901:9901 failgate
# Mount your own config at /etc/failgate/failgate.yaml.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin failgate \
 && mkdir -p /etc/failgate /var/lib/failgate \
 && chown failgate /var/lib/failgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/docker.yaml /etc/failgate/failgate.yaml
USER failgate
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]
# Exec form: SIGTERM and SIGHUP reach Failgate itself (graceful drain, reload).
ENTRYPOINT ["failgate"]
CMD ["run", "-c", "/etc/failgate/failgate.yaml", "--last-good", "/var/lib/failgate/last-good.yaml"]
