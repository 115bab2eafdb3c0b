# dnsgate as a container: DNS on port 53 (UDP and TCP), the consent API on 8053, consent in /data.
#   docker build -t dnsgate .
#   docker run -d --name dnsgate -p 53:53/udp -p 53:53/tcp -p 8053:8053 -v dnsgate-data:/data \
#     --ulimit nofile=4096:4096 -e DNSGATE_UPSTREAM=9.9.9.9,149.112.112.112 dnsgate
# The sample configuration is /etc/dnsgate/dnsgate.toml (DNSGATE_CONFIG); mount your own over it.
# A bind mount of /data must be writable by uid 10053 (docs/docker.md).
# --ulimit: the file descriptors dnsgate may hold (an image cannot set it). The default limits need
# about 740; at start dnsgate raises its soft limit to the hard one, logs what its configured limits
# can hold at once, and warns if that is more than the limit.
FROM python:3.11-slim

# iproute2: `ip -6 neigh` gives IPv6 clients' MAC addresses (with --network host).
# python may bind port 53 without running as root (Docker's default ip_unprivileged_port_start=0
# covers this too; the capability keeps it working where that sysctl is not set).
# Debian's slim base gets security fixes under new package versions: pinning them would break the
# build at the next fix, so the packages follow the base image's release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin iproute2 \
 && setcap cap_net_bind_service=+ep "$(readlink -f /usr/local/bin/python3)" \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10053 --home-dir /data --shell /usr/sbin/nologin dnsgate \
 && mkdir -p /data && chown dnsgate:dnsgate /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY config ./config
COPY dnsgate ./dnsgate
RUN pip install --no-cache-dir . \
 && mkdir -p /etc/dnsgate/vendors.d \
 && cp config/dnsgate.toml /etc/dnsgate/dnsgate.toml \
 && cp config/vendors.d/example.toml.sample /etc/dnsgate/vendors.d/ \
 && rm -rf /src

ENV DNSGATE_CONFIG=/etc/dnsgate/dnsgate.toml \
    DNSGATE_DNS=0.0.0.0:53 \
    DNSGATE_API=0.0.0.0:8053 \
    DNSGATE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 53/udp 53/tcp 8053/tcp
USER 10053:10053
WORKDIR /data
# `dnsgate health` reads the configuration as `serve` does (the file, then DNSGATE_API, DNSGATE_DNS, ...),
# so it asks the API and DNS addresses actually configured, whatever port they were moved to.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["dnsgate", "health", "--timeout", "2"]
ENTRYPOINT ["dnsgate"]
CMD ["serve"]
