#!/bin/sh
# The container's entry point: the first argument names the role.
set -eu
role="${1:-controller}"
[ "$#" -gt 0 ] && shift
case "$role" in
  controller) exec meshctl run "$@" ;;
  server) exec meshctl server "$@" ;;
  client) exec python -m meshctl.flower.clientservice "$@" ;;
  meshctl) exec meshctl "$@" ;;
  *)
    echo "unknown role '$role': use controller, server, client or meshctl" >&2
    exit 2
    ;;
esac
