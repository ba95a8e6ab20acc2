#!/usr/bin/env bash
# Stand-in base images for machines that cannot reach an image registry.
#
# The Dockerfile builds FROM python:3.11-slim-bookworm and the compose file runs redis:7-alpine
# and nginx:1.27-alpine. Where those images cannot be pulled (no registry reachable), this script
# builds look-alikes from Debian bookworm packages with debootstrap, imports them with
# `docker import` and tags them with those names, so that `docker build --pull=false` and
# `docker-compose up` work unchanged. They are STAND-INS, not the real images:
#
#   python:3.11-slim-bookworm   Debian's python3 3.11 (+ python3-venv, ca-certificates);
#                               `python`/`python3` in /usr/local/bin as in the real image
#   redis:7-alpine              Debian's redis-server 7.0 (+ redis-cli), run as user redis with
#                               protected mode off, as the real image's entrypoint does
#   nginx:1.27-alpine           Debian's nginx 1.22, `nginx -g 'daemon off;'`, STOPSIGNAL SIGQUIT
#
# The python stand-in carries this machine's CA bundle (/etc/ssl/certs/ca-certificates.crt) and
# points pip at it: where outbound TLS is re-signed by a proxy, pip inside `docker build` trusts
# only that bundle. Every stand-in has the label org.trio-gateway.standin=<script version>.
#
# Never pulls. A tag that already exists is kept: a real image (no stand-in label) is never
# replaced; a stand-in of this script version is reused. Root filesystems are cached as tarballs
# under $TRIO_GATEWAY_STANDIN_CACHE (default /var/cache/trio-gateway), so a rebuild after
# `docker rmi` (or on a new daemon) only re-imports them.
#
# Usage: deploy/standin-images.sh [--force]      (root, or sudo; needs debootstrap and docker)
#   --force   rebuild the stand-ins even when a tag exists (never replaces a real image)
set -euo pipefail

STANDIN_VERSION=1
LABEL=org.trio-gateway.standin
CACHE=${TRIO_GATEWAY_STANDIN_CACHE:-/var/cache/trio-gateway}
MIRROR=${TRIO_GATEWAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
HOST_CA=/etc/ssl/certs/ca-certificates.crt
DOCKER=${DOCKER:-docker}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

say() { printf '== standin-images: %s\n' "$*"; }
loud() { printf '!! standin-images: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$0" "$@"
fi
mkdir -p "$CACHE/debs"

# The stand-in label of a local image: "" when the tag is absent, "real" when it has no label.
image_state() {
    local labels
    if ! labels=$("$DOCKER" image inspect --format '{{json .Config.Labels}}' "$1" 2>/dev/null)
    then
        echo ""
        return
    fi
    # {"org.trio-gateway.standin":"1",...} -> 1; no such label (or no labels: null) -> real
    labels=$(printf '%s' "$labels" | grep -o "\"$LABEL\":\"[^\"]*\"" | cut -d'"' -f4 || true)
    echo "${labels:-real}"
}

# A root filesystem tarball from debootstrap, cached. $1 name, $2 packages, $3 hook (a function
# that adjusts the tree before it is packed).
rootfs_tarball() {
    local name=$1 packages=$2 hook=$3
    local tarball="$CACHE/standin-$name-v$STANDIN_VERSION.tar"
    if [ -s "$tarball" ] && [ "$FORCE" -eq 0 ]; then
        say "$name: cached root filesystem $tarball" >&2
        echo "$tarball"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || apt-get install -y debootstrap >&2 \
        || { apt-get update && apt-get install -y debootstrap; } >&2
    local root
    root=$(mktemp -d "$CACHE/rootfs-$name.XXXXXX")
    # shellcheck disable=SC2064  # expand $root now: the trap outlives this function's locals
    trap "rm -rf '$root'" EXIT
    say "$name: debootstrap --variant=minbase --include=$packages $SUITE ($MIRROR)" >&2
    debootstrap --variant=minbase --include="$packages" --cache-dir="$CACHE/debs" \
        "$SUITE" "$root" "$MIRROR" >&2
    # Slim it the way the real slim images are: no apt lists, docs, man pages or locales.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
        -exec rm -rf {} + 2>/dev/null || true
    "$hook" "$root"
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    trap - EXIT
    echo "$tarball"
}

python_hook() {
    local root=$1
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    # This machine's CA bundle (it may include a TLS-re-signing proxy's CA), for pip in builds.
    cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
}

redis_hook() {
    local root=$1
    mkdir -p "$root/data"
    chroot "$root" chown redis:redis /data
    # The real image's entrypoint: a leading option means redis-server; redis-server runs as
    # user redis with protected mode off (other containers reach it over the compose network).
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = "redis-server" ]; then
    shift
    exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$@" --protected-mode no
fi
exec "$@"
EOF
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
}

nginx_hook() {
    local root=$1
    # Debian's default site listens on :80; the real image ships a default server too, but the
    # compose file replaces nginx.conf entirely, so nothing here depends on it.
    rm -f "$root/etc/nginx/sites-enabled/default"
    ln -sf /dev/stdout "$root/var/log/nginx/access.log"
    ln -sf /dev/stderr "$root/var/log/nginx/error.log"
}

# $1 tag, $2 name, $3 packages, $4 hook, then `docker import --change` instructions.
standin() {
    local tag=$1 name=$2 packages=$3 hook=$4
    shift 4
    local state
    state=$(image_state "$tag")
    if [ "$state" = real ]; then
        say "$tag: a real image (no stand-in label) is present; kept as it is"
        return
    fi
    if [ "$state" = "$STANDIN_VERSION" ] && [ "$FORCE" -eq 0 ]; then
        loud "$tag is a STAND-IN (label $LABEL=$state, cached), NOT the real image"
        return
    fi
    local tarball
    tarball=$(rootfs_tarball "$name" "$packages" "$hook")
    local changes=(--change "LABEL $LABEL=$STANDIN_VERSION"
        --change "LABEL org.opencontainers.image.description=\"stand-in for $tag built by deploy/standin-images.sh from Debian $SUITE packages; NOT the real image\"")
    local layer=""
    for change in "$@"; do
        # `docker import --change` does not take STOPSIGNAL: that one goes into a tiny
        # Dockerfile layer on top of the imported tree (built locally, nothing pulled).
        case "$change" in
            STOPSIGNAL*) layer+="$change"$'\n' ;;
            *) changes+=(--change "$change") ;;
        esac
    done
    "$DOCKER" import "${changes[@]}" "$tarball" "$tag" >/dev/null
    if [ -n "$layer" ]; then
        local output
        if ! output=$(printf 'FROM %s\n%s' "$tag" "$layer" \
            | DOCKER_BUILDKIT=0 "$DOCKER" build --pull=false -q -t "$tag" - 2>&1); then
            printf '%s\n' "$output" >&2
            exit 1
        fi
    fi
    loud "$tag is a STAND-IN built from Debian $SUITE packages, NOT the real image"
}

loud "STAND-IN base images where the real ones are not present (no registry is used; nothing is pulled)"

standin python:3.11-slim-bookworm python "python3,python3-venv,ca-certificates" python_hook \
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "ENV LANG=C.UTF-8" \
    "ENV PIP_CERT=$HOST_CA" \
    "ENV SSL_CERT_FILE=$HOST_CA" \
    'CMD ["python3"]'

standin redis:7-alpine redis "redis-server" redis_hook \
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "WORKDIR /data" \
    "EXPOSE 6379" \
    'ENTRYPOINT ["docker-entrypoint.sh"]' \
    'CMD ["redis-server"]'

standin nginx:1.27-alpine nginx "nginx-light" nginx_hook \
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "EXPOSE 80" \
    "STOPSIGNAL SIGQUIT" \
    "CMD [\"nginx\", \"-g\", \"daemon off;\"]"

loud "done: the images above are STAND-INS for the registry images, built locally"
