#!/usr/bin/env bash
# Install the validators the tests run, where they are missing (apt-get, as root):
# docker-compose (the compose file) and systemd-analyze (the systemd unit). Elsewhere it says
# what is missing, and those tests skip with that reason.
set -euo pipefail

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    printf 'tools: installing %s with apt-get (once)\n' "${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
    printf 'tools: %s missing (apt-get install %s); their tests will skip\n' \
        "${missing[*]}" "${missing[*]}" >&2
fi
