#!/usr/bin/env bash
# Makes a local Debian base image with python3 for machines that cannot reach a container registry:
# debootstrap --variant=minbase, then `podman import`. Idempotent: does nothing when the image exists
# (pass --force to rebuild it).
#
#   docker/make-base-image.sh [--force] [IMAGE]      # IMAGE defaults to localhost/hogwild-base:bookworm
#
# The host's CA bundle is added to the image's trust store, so pip and apt inside builds and containers
# trust whatever the host trusts (needed where HTTPS goes through an intercepting proxy).
# Environment: SUITE (bookworm), MIRROR (http://deb.debian.org/debian), INCLUDE (python3,ca-certificates;
# empty: a bare minbase, like a CUDA base without Python), CONTAINERS_CONF (defaults to docker/containers.conf
# beside this script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
    shift
fi
suite="${SUITE:-bookworm}"
image="${1:-localhost/hogwild-base:$suite}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
include="${INCLUDE-python3,ca-certificates}"
host_ca=/etc/ssl/certs/ca-certificates.crt

log() { echo "make-base-image: $*" >&2; }

if [[ $force -eq 0 ]] && podman image exists "$image"; then
    log "$image exists (--force rebuilds it)"
    exit 0
fi

for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { log "$tool is missing (apt-get install debootstrap podman)"; exit 1; }
done
if [[ $(id -u) -ne 0 ]]; then
    log "debootstrap needs root"
    exit 1
fi

rootfs="$(mktemp -d /var/tmp/hogwild-rootfs.XXXXXX)"
cleanup() { rm -rf "$rootfs"; }
trap cleanup EXIT

log "debootstrap $suite ($mirror) into $rootfs"
debootstrap --variant=minbase ${include:+"--include=$include"} "$suite" "$rootfs" "$mirror" >&2

if [[ -s "$host_ca" ]]; then
    log "adding the host's CA bundle to the image's trust store"
    # Picked up now, or whenever the image installs ca-certificates later.
    install -D -m 0644 "$host_ca" "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
    if [[ -x "$rootfs/usr/sbin/update-ca-certificates" ]]; then
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
fi

# Slim it down; apt works again after `apt-get update`.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* \
    "$rootfs"/var/log/*.log "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
# A container's resolver and hostname come from the runtime.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

log "importing as $image"
tar --numeric-owner -C "$rootfs" -c . |
    podman import \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase $suite + ${include:-nothing}" \
        - "$image" >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$image" >&2
log "done: $image"
