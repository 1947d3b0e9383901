# syntax=docker/dockerfile:1.7
#
# ftpsd as a static musl binary on Alpine.
#
#   docker build -t ftpsd:dev .
#   docker run --rm -p 2121:2121 -p 30000-30019:30000-30019 \
#       -e FTPSD_PASSIVE__HOST=<address clients connect to> \
#       -e FTPSD_AUTH__USERS_FILE=/etc/ftpsd/users/users.toml \
#       -v ftpsd-data:/srv/ftp -v "$PWD/users.toml:/etc/ftpsd/users/users.toml:ro" ftpsd:dev
#
# Mount points:
#   /srv/ftp                 data directory (storage.data_dir), writable by uid 10001
#   /etc/ftpsd/ftpsd.toml    configuration file; the image ships container defaults there
#   /etc/ftpsd/users/        users.toml, read-only; set auth.users_file to use it
#   /etc/ftpsd/tls/          tls.crt and tls.key, as in a kubernetes.io/tls Secret, read-only
#   /var/lib/ftpsd/certs     self-signed pair generated when no certificate is configured
#
# NOTE: no container engine runs where this file is developed and checked, so the build itself
# is untested. CI lints this file with hadolint and runs the same binary, built with crt-static
# for the glibc host target, from an empty root directory (tests/e2e/test_static_rootfs.py).

ARG RUST_IMAGE=rust:1.95-alpine3.23
ARG RUNTIME_IMAGE=alpine:3.23

FROM ${RUST_IMAGE} AS build

ARG TARGET=x86_64-unknown-linux-musl

# bash, GNU patch and GNU tar run patches/apply.sh: it uses options that busybox lacks.
# musl-dev and gcc link the binary and compile ring's C and assembly sources.
# Versions are not pinned (DL3018) because an Alpine branch keeps only the newest build of each
# package, so a pinned version stops installing after its next security fix. The alpine3.23
# base tag already fixes the branch.
# hadolint ignore=DL3018
RUN apk add --no-cache bash gcc musl-dev patch tar

# Release profile settings for the image only, so that local release builds skip the slow fat LTO.
ENV CARGO_PROFILE_RELEASE_LTO=fat \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    RUSTFLAGS="-C target-feature=+crt-static"

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the manifests or the engine patches
# change, not on every source edit. The patch step is the one `make build` runs.
COPY Cargo.toml Cargo.lock ./
COPY patches/ patches/
RUN bash patches/apply.sh \
    && mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target "${TARGET}" \
    && rm -rf src

COPY src/ src/

# The placeholder build left artifacts newer than the copied sources; touching them makes
# cargo rebuild the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --target "${TARGET}" \
    && install -D -m 0755 "target/${TARGET}/release/ftpsd" /out/ftpsd \
    && /out/ftpsd --version

# A stage with no libc and no loader: the run succeeds only if the binary is fully static.
FROM scratch AS static-check
COPY --from=build /out/ftpsd /ftpsd
RUN ["/ftpsd", "--version"]

FROM ${RUNTIME_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="ftpsd" \
      org.opencontainers.image.description="An FTPS server for Kubernetes volumes, built on libunftp" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

# A system user without a shell or home directory. Only the writable directories belong to it,
# so a compromised server cannot replace its own binary or configuration.
RUN addgroup -S -g 10001 ftpsd \
    && adduser -S -D -H -u 10001 -G ftpsd -s /sbin/nologin -h /srv/ftp ftpsd \
    && install -d -o 10001 -g 10001 -m 0755 /srv/ftp /var/lib/ftpsd /var/lib/ftpsd/certs \
    && install -d -o 0 -g 0 -m 0755 /etc/ftpsd /etc/ftpsd/users /etc/ftpsd/tls

COPY --from=static-check --chown=0:0 --chmod=0755 /ftpsd /usr/local/bin/ftpsd

# Container defaults. Environment variables (FTPSD_SECTION__KEY) override this file, so
# Kubernetes sets its values through a ConfigMap without replacing it. The passive range
# matches EXPOSE below and the Kubernetes Service. auth.users_file stays unset because no layer
# can unset it again: without it the first run logs a generated user and its password.
COPY --chown=0:0 --chmod=0644 <<'EOF' /etc/ftpsd/ftpsd.toml
[server]
listen = "0.0.0.0:2121"

[passive]
ports = "30000-30019"

[tls]
generated_dir = "/var/lib/ftpsd/certs"

[storage]
data_dir = "/srv/ftp"

[admin]
listen = "0.0.0.0:9090"
EOF

ENV FTPSD_CONFIG=/etc/ftpsd/ftpsd.toml

USER 10001:10001
WORKDIR /srv/ftp

# Control port, passive data ports, admin HTTP (/healthz, /readyz, /metrics).
EXPOSE 2121/tcp 30000-30019/tcp 9090/tcp

VOLUME ["/srv/ftp", "/var/lib/ftpsd/certs"]

# busybox wget is part of the base image, so the health check needs no extra package.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/healthz"]

# ftpsd drains transfers for server.drain_timeout_secs (25 s by default) after SIGTERM, so
# give `docker stop` a longer timeout than that (`docker stop -t 30`).
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/ftpsd"]
CMD ["serve"]
