#!/bin/bash
# One-shot initialiser for one Mindchart MongoDB deployment (a single-node replica set).
# docker-compose.yml runs it in a throwaway mongo container after mongod has started; the
# service that owns the database starts only once this exits 0. Safe to run on every `up`.
#
# Environment:
#   MONGO_HOST               host:port of the mongod, also the replica-set member address that
#                            clients will be told about (so it must resolve for them)
#   MONGO_REPLICA_SET        replica-set name (rs0)
#   MONGO_ROOT_USERNAME      root user created by the image's first start
#   MONGO_ROOT_PASSWORD_FILE file holding its password
#   APP_DB                   the service's database
#   APP_USER                 the service's own user, readWrite on APP_DB and nothing else
#   APP_PASSWORD_FILE        file holding its password
set -euo pipefail

for var in MONGO_HOST MONGO_REPLICA_SET MONGO_ROOT_USERNAME MONGO_ROOT_PASSWORD_FILE \
           APP_DB APP_USER APP_PASSWORD_FILE; do
    if [ -z "${!var:-}" ]; then
        echo "init-replica-set: $var is not set" >&2
        exit 2
    fi
done

# directConnection: before rs.initiate there is no replica set to discover.
uri="mongodb://${MONGO_HOST}/admin?directConnection=true"

# Wait for the mongod started with --replSet. `hello` needs no authentication; a replica-set
# member reports `isreplicaset` (not yet initiated) or `setName` (initiated). This skips the
# standalone mongod the image runs briefly on a fresh volume to create the root user.
for attempt in $(seq 1 60); do
    if mongosh --quiet "$uri" --eval 'const h = db.hello(); quit(h.setName || h.isreplicaset ? 0 : 1)' \
        >/dev/null 2>&1; then
        break
    fi
    if [ "$attempt" -eq 60 ]; then
        echo "init-replica-set: ${MONGO_HOST} did not come up as a replica-set member in 120 s" >&2
        exit 1
    fi
    sleep 2
done

# The JavaScript reads the password files itself, so no secret appears on a command line.
exec mongosh --quiet "$uri" --file "$(dirname "$0")/init-replica-set.js"
