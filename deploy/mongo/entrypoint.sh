#!/bin/bash
# Entrypoint wrapper for the official mongo image, used by docker-compose.yml.
#
# A replica set with access control needs a keyfile (mongod: "security.keyFile is required when
# authorization is enabled with replica sets"), and mongod refuses one that is readable by group
# or others. Compose file secrets are bind mounts that keep the host file's owner and mode, so we
# copy the secret to a private file owned by the mongodb user, then hand over to the image's own
# entrypoint, which creates the root user on first start and drops to that user.
set -euo pipefail

: "${MONGO_KEYFILE_SOURCE:?set MONGO_KEYFILE_SOURCE to the mounted keyfile secret}"
: "${MONGO_KEYFILE:=/etc/mongo-keyfile}"

install -o mongodb -g mongodb -m 0400 "$MONGO_KEYFILE_SOURCE" "$MONGO_KEYFILE"

exec docker-entrypoint.sh "$@"
