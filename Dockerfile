# Failgate: a small image with only runtime dependencies, running as a non-root user.
#   docker build -t failgate .
#   docker run -e FAILGATE_ADMIN_TOKEN=... -e REDIS_URL=redis://redis:6379/0 -e UPSTREAM_URL=http://api:8000 \
#              -p 8080:8080 -p 127.0.0.1:9901:9901 -v failgate-state:/var/lib/failgate failgate
# Mount your own config at /etc/failgate/failgate.yaml.

FROM python:3.11-slim AS build
# The request path compiled by mypyc (README "Compiled build"); --build-arg FAILGATE_COMPILE=0 builds plain Python.
# The compiler stays in this stage: the image below gets only the wheel.
ARG FAILGATE_COMPILE=1
RUN pip install --no-cache-dir "setuptools>=70.1" \
 && if [ "$FAILGATE_COMPILE" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
      && pip install --no-cache-dir "mypy>=1.10"; \
    fi
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY benchmarks ./benchmarks
RUN FAILGATE_COMPILE=$FAILGATE_COMPILE pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin failgate \
 && mkdir -p /etc/failgate /var/lib/failgate \
 && chown failgate /var/lib/failgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/docker.yaml /etc/failgate/failgate.yaml
USER failgate
EXPOSE 8080 9901
# /readyz, at the admin address the config names: unhealthy while no worker is ready (crash-looping workers) or
# while draining; a store outage is not unhealthy (the routes' fail modes handle it).
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
  CMD ["failgate", "health", "-c", "/etc/failgate/failgate.yaml"]
# The last good config and the state directory (remembered API-key answers, revocations) outlive the container.
VOLUME ["/var/lib/failgate"]
# Exec form: SIGTERM and SIGHUP reach Failgate itself (graceful drain, reload).
ENTRYPOINT ["failgate"]
CMD ["run", "-c", "/etc/failgate/failgate.yaml", "--last-good", "/var/lib/failgate/last-good.yaml"]
