#!/usr/bin/env bash
# Find or start a RabbitMQ broker for events-bridge (SPEC §1, §9), and print its AMQP URL on stdout.
#
#   deploy/broker.sh ensure [--version 3|4]   print a reachable broker's URL, starting one if needed
#   deploy/broker.sh stop [--version 3|4]     stop the private node or container this script started
#   deploy/broker.sh status [--version 3|4]   say which broker would be used, start nothing
#
# Without --version (or with --version 3): $BRIDGE_AMQP_URL; else a broker already listening on
# 127.0.0.1:5672; else Docker (rabbitmq:3-management) where a Docker engine answers; else a private
# `rabbitmq-server` node (Debian 12: 3.10), installed with apt-get when missing (root only), bound
# to 127.0.0.1, its data under .local/.
# With --version 4: always the private RabbitMQ 4.0 container events-bridge-rabbitmq4 (podman,
# image localhost/rabbitmq:4 from Debian 13, built by deploy/container/image.sh rabbitmq; podman
# installed when missing, root only) on 127.0.0.1:5682; BRIDGE_AMQP_URL and :5672 are not looked
# at. `stop` removes the container, and its data with it.
# Progress goes to stderr, so `URL=$(deploy/broker.sh ensure)` stays clean.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
local_dir="$here/.local"
node_dir="$local_dir/rabbitmq"
nodename="events-bridge@localhost"
container="events-bridge-rabbitmq"
default_url="amqp://guest:guest@127.0.0.1:5672/"
wait_seconds=${BRIDGE_BROKER_WAIT:-120}
# RabbitMQ 4: a podman container of its own; 5672 is a developer's broker or the 3.10 node.
rmq4_container="events-bridge-rabbitmq4"
rmq4_image="localhost/rabbitmq:4"
rmq4_port=5682
rmq4_dir="$local_dir/rabbitmq4"
rmq4_url="amqp://guest:guest@127.0.0.1:$rmq4_port/"

say() { printf 'broker: %s\n' "$*" >&2; }
die() { printf 'broker: error: %s\n' "$*" >&2; exit 1; }

port_open() {  # host port -> 0 when something accepts TCP there (bounded: a dead forward hangs)
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

wait_port() {  # host port what
    local deadline=$((SECONDS + wait_seconds))
    while ! port_open "$1" "$2"; do
        ((SECONDS < deadline)) || die "$3 did not accept AMQP on $1:$2 within ${wait_seconds}s"
        sleep 0.2
    done
}

docker_ok() { command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1; }

node_env() {
    # The scripts under /usr/lib/rabbitmq/bin run the node as the calling user (root here), so the
    # data folder inside the checkout needs no permission changes for the `rabbitmq` user.
    export RABBITMQ_NODENAME="$nodename"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=5672
    export RABBITMQ_DIST_PORT=25679
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
    export RABBITMQ_MNESIA_BASE="$node_dir/mnesia"
    export RABBITMQ_LOG_BASE="$node_dir/log"
    export RABBITMQ_PID_FILE="$node_dir/rabbit.pid"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$node_dir/enabled_plugins"
    export RABBITMQ_CONFIG_FILE="$node_dir/rabbitmq"
    export HOME="${HOME:-/root}"
}

install_rabbitmq() {
    [ "$(id -u)" = 0 ] || die "rabbitmq-server is not installed and this is not root: install it (apt-get install rabbitmq-server), or set BRIDGE_AMQP_URL"
    command -v apt-get >/dev/null 2>&1 || die "rabbitmq-server is missing and apt-get is not available: set BRIDGE_AMQP_URL"
    say "installing rabbitmq-server with apt-get (once; about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq rabbitmq-server >&2
}

start_node() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || install_rabbitmq
    node_env
    mkdir -p "$node_dir/mnesia" "$node_dir/log"
    [ -f "$node_dir/enabled_plugins" ] || echo '[].' >"$node_dir/enabled_plugins"
    # Loopback only; the guest user may then log in, as it may only from loopback anyway.
    [ -f "$node_dir/rabbitmq.conf" ] || cat >"$node_dir/rabbitmq.conf" <<'EOF'
listeners.tcp.default = 127.0.0.1:5672
loopback_users.guest = true
EOF
    say "starting a private RabbitMQ node $nodename on 127.0.0.1:5672 (data in .local/rabbitmq)"
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached >"$node_dir/log/startup.out" 2>&1 \
        || die "rabbitmq-server failed to start; see $node_dir/log/"
    wait_port 127.0.0.1 5672 "the private node (logs in $node_dir/log/)"
    say "private node ready"
}

ensure() {
    if [ -n "${BRIDGE_AMQP_URL:-}" ]; then
        say "using BRIDGE_AMQP_URL"
        echo "$BRIDGE_AMQP_URL"
        return
    fi
    if port_open 127.0.0.1 5672; then
        say "a broker is already listening on 127.0.0.1:5672"
        echo "$default_url"
        return
    fi
    if docker_ok; then
        say "starting RabbitMQ in Docker (container $container)"
        docker rm -f "$container" >/dev/null 2>&1 || true
        docker run -d --rm --name "$container" -p 127.0.0.1:5672:5672 -p 127.0.0.1:15672:15672 \
            rabbitmq:3-management >/dev/null
        wait_port 127.0.0.1 5672 "the Docker broker"
        # The port opens before the broker finishes booting inside the container; give it a moment.
        sleep 3
        echo "$default_url"
        return
    fi
    start_node
    echo "$default_url"
}

stop() {
    if [ -f "$node_dir/rabbit.pid" ]; then
        node_env
        say "stopping the private node $nodename"
        /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$nodename" stop "$node_dir/rabbit.pid" >&2 || true
        rm -f "$node_dir/rabbit.pid"
    elif docker_ok && docker inspect "$container" >/dev/null 2>&1; then
        say "stopping container $container"
        docker stop "$container" >/dev/null
    else
        say "no broker started by this script is running"
    fi
}

status() {
    if [ -n "${BRIDGE_AMQP_URL:-}" ]; then say "BRIDGE_AMQP_URL is set"
    elif port_open 127.0.0.1 5672; then say "a broker listens on 127.0.0.1:5672"
    elif docker_ok; then say "no broker; Docker answers, ensure would start a container"
    else say "no broker; ensure would start a private node"
    fi
}

# -- RabbitMQ 4 (--version 4): the container -----------------------------------------------------

use_podman() {  # [install]: podman on the project's store (.local/containers); 1 without podman
    if ! command -v podman >/dev/null 2>&1; then
        [ "${1:-}" = install ] || return 1
        say "podman is missing: installing it (deploy/container/image.sh test-tools)"
        "$here/deploy/container/image.sh" test-tools
    fi
    eval "$("$here/deploy/container/image.sh" env)"
}

rmq4_state() {  # running, exited, created, ... or nothing when there is no such container
    podman container inspect --format '{{.State.Status}}' "$rmq4_container" 2>/dev/null || true
}

rmq4_ctl() {  # rabbitmqctl inside the container, bounded
    timeout 90 podman exec "$rmq4_container" rabbitmqctl "$@"
}

rmq4_create() {
    if port_open 127.0.0.1 "$rmq4_port"; then
        die "something else listens on 127.0.0.1:$rmq4_port; the RabbitMQ 4 container needs that port"
    fi
    # A dead forward to this port, left by a container killed with its podman, would come first.
    "$here/deploy/container/image.sh" unforward "$rmq4_port"
    podman image exists "$rmq4_image" || "$here/deploy/container/image.sh" rabbitmq
    mkdir -p "$rmq4_dir"
    # Connections come through the port mapping, not from the container's loopback: guest must
    # be allowed from elsewhere. Only 127.0.0.1 of the host reaches the port. x-queue-master-locator
    # is refused, as later versions will (4.0 permits it). Not transient_nonexcl_queues: with it
    # denied, 4.0.5's `rabbitmqctl start_app` fails about one time in eight
    # (failed_to_deny_deprecated_features), and global_qos is not enforced by 4.0.5 at all.
    printf '%s\n' 'loopback_users.guest = false' 'listeners.tcp.default = 5672' \
        'deprecated_features.permit.queue_master_locator = false' >"$rmq4_dir/rabbitmq.conf"
    chmod 644 "$rmq4_dir/rabbitmq.conf"  # read by the container's rabbitmq user
    say "starting RabbitMQ 4 in podman (container $rmq4_container, 127.0.0.1:$rmq4_port)"
    # --init: PID 1 forwards SIGTERM (rabbitmq-server is a shell script), so a stop takes 0.3 s.
    podman run -d --init --name "$rmq4_container" --hostname "$rmq4_container" \
        -p "127.0.0.1:$rmq4_port:5672" \
        -v "$rmq4_dir/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" "$rmq4_image" >/dev/null
}

rmq4_wait() {  # until the node has booted and AMQP answers; bounded
    local deadline=$((SECONDS + wait_seconds)) state
    # await_startup fails at once while the node's VM is not up yet: try again until the deadline.
    until rmq4_ctl -q await_startup --timeout 60 >/dev/null 2>&1; do
        state=$(rmq4_state)
        [ "$state" = running ] || die "container $rmq4_container is $state: podman logs $rmq4_container"
        ((SECONDS < deadline)) || die "RabbitMQ 4 did not start within ${wait_seconds}s: podman logs $rmq4_container"
        sleep 1
    done
    wait_port 127.0.0.1 "$rmq4_port" "RabbitMQ 4 (podman logs $rmq4_container)"
}

ensure4() {
    use_podman install
    case $(rmq4_state) in
        running) ;;
        "") rmq4_create ;;
        *)
            say "starting the existing container $rmq4_container"
            "$here/deploy/container/image.sh" unforward "$rmq4_port"
            podman start "$rmq4_container" >/dev/null
            ;;
    esac
    rmq4_wait
    say "RabbitMQ $(rmq4_ctl -q version 2>/dev/null || echo 4) ready on 127.0.0.1:$rmq4_port"
    echo "$rmq4_url"
}

stop4() {
    if ! use_podman || [ -z "$(rmq4_state)" ]; then  # nothing to stop (and no install for that)
        say "no container $rmq4_container"
        return
    fi
    say "stopping and removing container $rmq4_container"
    podman stop -t 15 "$rmq4_container" >/dev/null || true
    podman rm -f "$rmq4_container" >/dev/null
}

status4() {
    if ! use_podman; then
        say "no podman; ensure --version 4 would install it and start container $rmq4_container"
        return
    fi
    local state
    state=$(rmq4_state)
    case $state in
        running) say "container $rmq4_container runs: $rmq4_url" ;;
        "") say "no container $rmq4_container; ensure --version 4 would start one on 127.0.0.1:$rmq4_port" ;;
        *) say "container $rmq4_container is $state; ensure --version 4 would start it again" ;;
    esac
}

command=ensure version=3
while [ $# -gt 0 ]; do
    case $1 in
        --version) version=${2:?--version needs 3 or 4}; shift 2 ;;
        --version=*) version=${1#--version=}; shift ;;
        -h | --help | help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        ensure | stop | status) command=$1; shift ;;
        *) die "unknown argument '$1' (ensure, stop, status; --version 3|4)" ;;
    esac
done
case $version in
    3 | 3.*) "$command" ;;
    4 | 4.*) "${command}4" ;;
    *) die "no RabbitMQ $version here: 3 (the default) or 4" ;;
esac
