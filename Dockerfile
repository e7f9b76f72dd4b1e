# cfwrap and cfssl 1.6.5 (Debian trixie's golang-cfssl) in one image.
#
#   docker build -t cfwrap .
#   mkdir -p kit && docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/kit:/kit" cfwrap \
#       quickstart --out /kit/nomad-tls
#
# Where outbound TLS needs an extra CA (a proxy), pass it as a build secret; it is used for pip
# only and never stored in the image:
#   docker build --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt -t cfwrap .
# ./scripts/image builds and smoke-tests this file with docker or podman.

# The Debian trixie base. ./scripts/image with podman (no registry reachable) points this at one it
# made with debootstrap, localhost/cfwrap-base:<hash of its recipe>, so a stale cached base is never
# mistaken for a current one.
ARG DEBIAN_IMAGE=debian:trixie-slim

FROM ${DEBIAN_IMAGE} AS base
# Pinned Debian packages: bump together with tests/test_image.py's expectations.
ARG CFSSL_VERSION=1.6.5-2+b9
ARG OPENSSL_VERSION=3.5.9-1~deb13u1
ARG PYTHON_VERSION=3.13.5-1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Keep the image small: no docs, manuals or translations, and only the cfssl binaries cfwrap
# uses (golang-cfssl also ships cfssl-bundle, -certinfo, -mkbundle, -newkey and -scan, ~65 MB).
RUN printf '%s\n' \
        'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
        'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/locale/*' \
        'path-exclude=/usr/bin/cfssl-*' >/etc/dpkg/dpkg.cfg.d/cfwrap-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        golang-cfssl="${CFSSL_VERSION}" \
        openssl="${OPENSSL_VERSION}" \
        python3="${PYTHON_VERSION}" \
        python3-venv="${PYTHON_VERSION}" \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# ./scripts/image lock: the hashes of exactly the wheels this base's pip picks.
FROM base AS lock
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY requirements.in /src/requirements.in
WORKDIR /tmp/wheels
RUN --mount=type=secret,id=pipca,required=false \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && python3 -m venv /tmp/lock \
    && /tmp/lock/bin/pip download --no-cache-dir --disable-pip-version-check --only-binary=:all: \
        -r /src/requirements.in -d /tmp/wheels \
    && for wheel in *.whl; do \
        IFS=- read -r name version _ <<<"${wheel}"; \
        echo "${name}==${version} --hash=sha256:$(sha256sum "${wheel}" | cut -d' ' -f1)"; \
    done | sort >/requirements.lock

FROM scratch AS lock-out
COPY --from=lock /requirements.lock /requirements.lock

FROM base AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY requirements.lock /src/requirements.lock
RUN --mount=type=secret,id=pipca,required=false \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && python3 -m venv /opt/cfwrap \
    && /opt/cfwrap/bin/pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
        --require-hashes --no-deps -r /src/requirements.lock
COPY pyproject.toml README.md /src/cfwrap-src/
COPY cfwrap /src/cfwrap-src/cfwrap
COPY schemas /src/cfwrap-src/schemas
RUN /opt/cfwrap/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --no-build-isolation --no-index /src/cfwrap-src \
    && /opt/cfwrap/bin/pip uninstall --yes --disable-pip-version-check setuptools \
    && /opt/cfwrap/bin/pip check --disable-pip-version-check

FROM base
ARG CFWRAP_VERSION=0.1.0
ARG CFSSL_VERSION=1.6.5-2+b9
LABEL org.opencontainers.image.title="cfwrap" \
      org.opencontainers.image.description="Nomad TLS kits made by cfssl 1.6.5, checked, with a manifest" \
      org.opencontainers.image.version="${CFWRAP_VERSION}" \
      io.cfwrap.cfssl.package="golang-cfssl" \
      io.cfwrap.cfssl.version="${CFSSL_VERSION}"
COPY --from=build /opt/cfwrap /opt/cfwrap
# The group gets the same fixed id: useradd --user-group would pick a free system gid (999), and
# USER 10001:10001 would then run in a group with no name that does not own /kit.
RUN groupadd --system --gid 10001 cfwrap \
    && useradd --system --uid 10001 --gid 10001 --home-dir /kit --no-create-home \
        --shell /usr/sbin/nologin cfwrap \
    && install -d -o cfwrap -g cfwrap -m 0700 /kit
ENV PATH=/opt/cfwrap/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /kit
VOLUME ["/kit"]
ENTRYPOINT ["cfwrap"]
CMD ["--help"]
