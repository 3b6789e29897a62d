#!/usr/bin/env bash
# Build the events-bridge container image, and the few images its tests need, with podman (or
# docker where podman is missing and a Docker engine answers). Progress goes to stderr.
#
#   deploy/container/image.sh build [--base IMAGE]  events-bridge:<version> and :latest, saved to
#                                                   .local/image/events-bridge-<version>.tar
#   deploy/container/image.sh base                  localhost/debian:bookworm-slim from debootstrap
#   deploy/container/image.sh rabbitmq [--version 4|3]
#                                                   localhost/rabbitmq:4 (Debian 13's rabbitmq-server
#                                                   4.0), or with --version 3 localhost/rabbitmq:3.10
#                                                   (Debian 12's 3.10): the cluster suite runs both
#   deploy/container/image.sh test-tools            podman and docker-compose for make test-image
#   deploy/container/image.sh env                   the exports that point podman at this store
#   deploy/container/image.sh engine                print podman or docker (installing podman if needed)
#   deploy/container/image.sh unforward PORT...     remove dead forwards to 127.0.0.1:PORT (below)
#
# A container killed with its podman (a machine's processes killed at once, a store deleted under
# a running container) can leave netavark's iptables rules behind. A dead rule for a host port
# comes before the rule of the next container published there and sends its connections to an
# address nobody has: the next broker "does not accept AMQP". `unforward` deletes netavark's
# forwarding rules for each PORT on which nothing answers now (so none of them can be alive), and
# does nothing where it is not root or iptables is missing. Only rules for 127.0.0.1 are touched
# (where the tests and broker.sh publish); netavark's nftables driver (podman 5) is not looked at.
# The tests and broker.sh run it before they publish a fixed port.
#
# Without --base (or BASE=), the base is a Debian 12 root file system made here with debootstrap
# and imported (no registry needed); with it, the base is pulled as usual, e.g. python:3.11-slim.
# A machine whose HTTPS is re-signed by a local CA passes its bundle to pip as a build secret
# (CA_BUNDLE=, default: the system bundle); it is never copied into any layer.
# Podman keeps its state under .local/containers unless CONTAINERS_CONF/CONTAINERS_STORAGE_CONF
# are already set: `eval "$(deploy/container/image.sh env)"` gives a shell the same store.
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
store="$here/.local/containers"
out="$here/.local/image"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/bridge/__init__.py")
name=events-bridge
debian_base=localhost/debian:bookworm-slim

say() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

mirror() {  # the Debian mirror apt already uses here (or its security one), else deb.debian.org
    local kind=${1:-debian} found
    found=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        2>/dev/null | grep -oE "https?://[^ ]+/$kind/?( |\$)" | head -n1 | tr -d ' ' || true)
    if [ "$kind" = debian ]; then echo "${MIRROR:-${found:-http://deb.debian.org/debian}}"
    else echo "${SECURITY_MIRROR:-${found:-http://deb.debian.org/debian-security}}"
    fi
}

apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        || die "$* missing: install it (apt-get install $*), or run as root on Debian/Ubuntu"
    say "installing $* with apt-get (once)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "$@" >&2
}

docker_ok() { command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1; }

podman_env() {
    # Our own store and settings, unless the caller has chosen theirs. runc, not crun (crun 1.8
    # refuses hybrid cgroup layouts), native overlay, and ulimits this host can grant.
    if [ -n "${CONTAINERS_CONF:-}${CONTAINERS_STORAGE_CONF:-}" ]; then return; fi
    mkdir -p "$store/c/storage" "$store/c/run" "$store/c/networks" "$store/c/tmp"
    local nofile nproc
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    # No more processes than pids can exist (runc was refused 96363 on a host whose pid_max and
    # container limit are 32768).
    local pids
    pids=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pids" ]; then nproc=$pids; fi
    cat >"$store/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$store/c/storage"
runroot = "$store/c/run"
EOF
    cat >"$store/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
tmp_dir = "$store/c/tmp"
[network]
network_config_dir = "$store/c/networks"
EOF
    export CONTAINERS_STORAGE_CONF="$store/storage.conf" CONTAINERS_CONF="$store/containers.conf"
    export TMPDIR="$store/c/tmp"
}

install_podman() {
    # podman, runc (crun 1.8 refuses hybrid cgroup layouts) and debootstrap; then what this
    # release has of the rest (Ubuntu 22.04 has no netavark, Debian 13 no dnsname plugin).
    apt_install podman runc debootstrap
    local extra=() package
    for package in buildah fuse-overlayfs slirp4netns uidmap catatonit netavark aardvark-dns \
        containernetworking-plugins golang-github-containernetworking-plugin-dnsname iptables; do
        apt-cache show "$package" >/dev/null 2>&1 && extra+=("$package")
    done
    [ ${#extra[@]} -eq 0 ] || apt_install "${extra[@]}"
}

engine() {
    if command -v podman >/dev/null 2>&1; then echo podman
    elif docker_ok; then echo docker
    else
        install_podman
        echo podman
    fi
}

slim() {  # rootfs: as Debian's own -slim images, no manuals, documentation or translations
    local root=${1:?}  # never the host's /
    [ -d "$root/etc/dpkg" ] && [ "$root" != / ] || die "slim: $root is not a new root file system"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
        >"$root/etc/dpkg/dpkg.cfg.d/slim"  # what apt installs later, too
    find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
    rm -rf "$root"/usr/share/{man,info,locale,lintian}/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

scrub() {  # dir: a rootfs of ours, removed with whatever an interrupted debootstrap left mounted
    local dir=${1:?} mounted
    case $dir in "$store"/rootfs-*) ;; *) die "scrub: $dir is not a folder of ours" ;; esac
    [ -e "$dir" ] || return 0
    for mounted in $(findmnt -rno TARGET | awk -v d="$dir/" 'index($0, d) == 1' | sort -r); do
        umount -l "$mounted" || die "cannot unmount $mounted (left by debootstrap): unmount it"
    done
    rm -rf --one-file-system "$dir"
}

upgrade() {  # root suite: Debian's updates and security fixes, as the official images carry
    local root=${1:?} suite=${2:?}
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
        "$(mirror)" "$suite" "$(mirror)" "$suite" "$(mirror debian-security)" "$suite" \
        >"$root/etc/apt/sources.list"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -y -qq upgrade >&2
    rm -f "$root/etc/resolv.conf"
}

rootfs_image() {  # tag suite: a minbase Debian rootfs, imported as an image
    local tag=$1 suite=$2 engine=$3 dir="$store/rootfs-$2"
    if $engine image exists "$tag" 2>/dev/null || $engine image inspect "$tag" >/dev/null 2>&1; then
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root, or give a base (BASE=python:3.11-slim)"
    say "debootstrap $suite from $(mirror), with its security updates (about 40 s, once)"
    scrub "$dir"
    debootstrap --variant=minbase "$suite" "$dir" "$(mirror)" >"$store/debootstrap-$suite.log" 2>&1 \
        || die "debootstrap $suite failed: see $store/debootstrap-$suite.log"
    upgrade "$dir" "$suite" 2>>"$store/debootstrap-$suite.log" \
        || die "the updates of $suite failed: see $store/debootstrap-$suite.log"
    slim "$dir"
    tar -C "$dir" -c . | $engine import - "$tag" >/dev/null
    scrub "$dir"
    say "base $tag imported"
}

secret_args() {  # the CA bundle pip should trust, as a build secret (never in a layer)
    local bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
    [ -s "$bundle" ] && echo "--secret=id=ca-bundle,src=$bundle"
    return 0
}

build() {
    local base=${BASE:-} engine started
    while [ $# -gt 0 ]; do
        case $1 in
            --base) base=${2:?--base needs an image}; shift 2 ;;
            *) die "unknown option '$1' (build [--base IMAGE])" ;;
        esac
    done
    engine=$(engine)
    [ "$engine" = podman ] && podman_env
    mkdir -p "$store"
    if [ -z "$base" ]; then
        rootfs_image "$debian_base" bookworm "$engine"
        base=$debian_base
    fi
    started=$SECONDS
    say "building $name:$version from $base with $engine"
    local args=(build)
    [ "$engine" = podman ] && args+=(--format docker)  # docker's format keeps the HEALTHCHECK
    # shellcheck disable=SC2046 # secret_args prints one word or none
    DOCKER_BUILDKIT=1 $engine "${args[@]}" $(secret_args) --build-arg "BASE=$base" \
        --label "org.opencontainers.image.version=$version" \
        -t "$name:$version" -t "$name:latest" -f "$here/deploy/container/Containerfile" "$here" >&2
    mkdir -p "$out"
    rm -f "$out/$name-$version.tar"
    if [ "$engine" = podman ]; then
        podman save --format docker-archive -m -o "$out/$name-$version.tar" \
            "$name:$version" "$name:latest" >/dev/null
    else
        docker save -o "$out/$name-$version.tar" "$name:$version" "$name:latest"
    fi
    say "built $name:$version in $((SECONDS - started)) s; $($engine image inspect \
        --format '{{.Size}}' "$name:$version" | awk '{printf "%.0f MB", $1/1e6}'); saved to \
.local/image/$name-$version.tar ($(du -m "$out/$name-$version.tar" | cut -f1) MB)"
}

rabbitmq() {  # [--version 4|3]: one Containerfile, on Debian 13 (4.0) or Debian 12 (3.10)
    local version=4 engine image base suite
    while [ $# -gt 0 ]; do
        case $1 in
            --version) version=${2:?--version needs 4 or 3}; shift 2 ;;
            *) die "unknown option '$1' (rabbitmq [--version 4|3])" ;;
        esac
    done
    case $version in
        4 | 4.0) image=localhost/rabbitmq:4 base=localhost/debian:trixie suite=trixie ;;
        3 | 3.10) image=localhost/rabbitmq:3.10 base=$debian_base suite=bookworm ;;
        *) die "no RabbitMQ $version here: 4 (Debian 13's 4.0) or 3 (Debian 12's 3.10)" ;;
    esac
    engine=$(engine)
    [ "$engine" = podman ] && podman_env
    mkdir -p "$store"
    if $engine image inspect "$image" >/dev/null 2>&1; then return; fi
    rootfs_image "$base" "$suite" "$engine"
    say "building $image (Debian $suite's rabbitmq-server)"
    local args=(build)
    [ "$engine" = podman ] && args+=(--format docker)
    $engine "${args[@]}" --build-arg "BASE=$base" -t "$image" \
        -f "$here/deploy/container/rabbitmq4/Containerfile" "$here/deploy/container/rabbitmq4" >&2
}

port_answers() { timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

netavark_chains() {  # the nat chains where netavark keeps its host port forwards
    iptables -w -t nat -S 2>/dev/null \
        | awk '$1 == "-N" && $2 ~ /^NETAVARK-(HOSTPORT-DNAT|DN-)/ { print $2 }'
}

unforward() {  # PORT...: netavark's forwards of dead host ports, removed (as root, with iptables)
    local port chain number
    for port in "$@"; do
        [[ $port =~ ^[0-9]+$ ]] || die "unforward: '$port' is not a port number"
    done
    [ "$(id -u)" = 0 ] && command -v iptables >/dev/null 2>&1 || return 0
    for port in "$@"; do
        port_answers "$port" && continue  # a live forward (or a listener): not ours to touch
        for chain in $(netavark_chains); do
            # The rules that send 127.0.0.1:PORT on (DNAT, and the mark for its masquerade);
            # highest number first, so the numbers still to delete stay valid. Columns of -L:
            # num target prot opt source destination match...
            for number in $(iptables -w -t nat -L "$chain" -n --line-numbers 2>/dev/null \
                | awk -v p="dpt:$port" '$6 == "127.0.0.1" {
                      for (i = 7; i <= NF; i++) if ($i == p) { print $1; break } }' \
                | sort -rn); do
                iptables -w -t nat -D "$chain" "$number"
                say "removed a dead port forward to 127.0.0.1:$port ($chain rule $number)"
            done
        done
        unjump "$port"
    done
}

unjump() {  # PORT: netavark's jumps for PORT into a chain with no rule left for it
    local port=$1 number target rules
    iptables -w -t nat -L NETAVARK-HOSTPORT-DNAT -n --line-numbers 2>/dev/null \
        | awk -v p="dpt:$port" 'NR > 2 { for (i = 7; i <= NF; i++) if ($i == p) print $1, $2 }' \
        | sort -rn | while read -r number target; do
            rules=$(iptables -w -t nat -L "$target" -n 2>/dev/null || true)
            grep -qw "dpt:$port" <<<"$rules" && continue
            iptables -w -t nat -D NETAVARK-HOSTPORT-DNAT "$number"
            say "removed a dead jump for port $port (NETAVARK-HOSTPORT-DNAT rule $number)"
        done
}

test_tools() {  # what make test-image needs beside the images: podman itself, docker-compose
    command -v podman >/dev/null 2>&1 || install_podman
    command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
}

case "${1:-build}" in
    build) shift || true; build "$@" ;;
    base) e=$(engine); [ "$e" = podman ] && podman_env; mkdir -p "$store"; rootfs_image "$debian_base" bookworm "$e" ;;
    rabbitmq) shift; rabbitmq "$@" ;;
    test-tools) test_tools ;;
    env) podman_env; printf 'export CONTAINERS_STORAGE_CONF=%q CONTAINERS_CONF=%q TMPDIR=%q\n' \
        "${CONTAINERS_STORAGE_CONF:-}" "${CONTAINERS_CONF:-}" "${TMPDIR:-/tmp}" ;;
    engine) engine ;;
    unforward) shift; unforward "$@" ;;
    -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
    *) die "unknown command '$1' (build, base, rabbitmq, test-tools, env, engine, unforward)" ;;
esac
