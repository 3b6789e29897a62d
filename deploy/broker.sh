#!/usr/bin/env bash
# Find or start a RabbitMQ broker for events-bridge (SPEC §1), and print its AMQP URL on stdout.
#
#   deploy/broker.sh ensure   print a reachable broker's URL, starting one if needed
#   deploy/broker.sh stop     stop the private node or container this script started
#   deploy/broker.sh status   say which broker would be used, start nothing
#
# Order: $BRIDGE_AMQP_URL; else a broker already listening on 127.0.0.1:5672; else Docker
# (rabbitmq:3-management) where a Docker engine answers; else a private `rabbitmq-server` node,
# installed with apt-get when missing (root only), bound to 127.0.0.1, its data under .local/.
# Progress goes to stderr, so `URL=$(deploy/broker.sh ensure)` stays clean.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
local_dir="$here/.local"
node_dir="$local_dir/rabbitmq"
nodename="events-bridge@localhost"
container="events-bridge-rabbitmq"
default_url="amqp://guest:guest@127.0.0.1:5672/"
wait_seconds=${BRIDGE_BROKER_WAIT:-120}

say() { printf 'broker: %s\n' "$*" >&2; }
die() { printf 'broker: error: %s\n' "$*" >&2; exit 1; }

port_open() {  # host port -> 0 when something accepts TCP there
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0 || return 1
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

case "${1:-ensure}" in
    ensure) ensure ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (ensure, stop, status)" ;;
esac
