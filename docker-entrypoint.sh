#!/bin/sh
# `hpo` is the entrypoint; `docker compose run --rm worker hpo final-train ...` also works.
set -e
if [ "$1" = "hpo" ]; then
  shift
fi
exec hpo "$@"
