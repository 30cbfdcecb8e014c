#!/bin/sh
# The official redis image is built with protected mode off, so a redis-server started without
# a config file accepts its container network's clients; Debian's binary needs it said.
if [ "${1:-}" = redis-server ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
