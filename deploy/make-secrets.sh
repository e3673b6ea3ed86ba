#!/usr/bin/env bash
# Generate the secrets docker-compose.yml reads from deploy/secrets/ (git-ignored, never baked
# into an image). Run once before the first `docker compose up`:
#
#   deploy/make-secrets.sh            create whatever is missing, keep what exists
#   deploy/make-secrets.sh --force    regenerate everything (only for a fresh stack: the MongoDB
#                                     root passwords are set on a volume's first start, so run
#                                     `docker compose down -v` too)
#
# Needs bash and openssl. The same files, loaded into Kubernetes Secrets, serve deploy/k8s
# (see deploy/README.md).
set -euo pipefail

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

dir="$(cd "$(dirname "$0")" && pwd)/secrets"
# The folder is private to the host user. The files inside are mode 0644 because Compose mounts a
# file secret as a bind mount with the host's owner and mode, and the containers read them as
# their own users (uid 10001 for the services, 999 for mongod); the folder's 0700 is what keeps
# other host users out.
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

# write NAME COMMAND...: run COMMAND, store its stdout as NAME unless NAME exists (or --force).
write() {
    local name="$1"; shift
    local path="$dir/$name"
    if [ -e "$path" ] && [ "$force" -eq 0 ]; then
        echo "kept      $name"
        return
    fi
    "$@" > "$path.tmp"
    chmod 0644 "$path.tmp"
    mv "$path.tmp" "$path"
    echo "generated $name"
}

# Hex passwords: safe inside a mongodb:// URL without percent-encoding.
password() { openssl rand -hex 32; }

# The service's MongoDB URL embeds its password, so it is derived from the password file.
mongo_url() {
    printf 'mongodb://%s:%s@mongo-%s:27017/mindchart_%s?replicaSet=rs0&authSource=mindchart_%s\n' \
        "$1" "$(cat "$dir/$1-mongo-password")" "$1" "$1" "$1"
}

for svc in records psychnotes gateway; do
    # The deployment's root user (used only by deploy/mongo/init-replica-set.sh) and its
    # replica-set keyfile (base64 of 756 bytes: within mongod's 6..1024 character limit).
    write "mongo-$svc-root-password" password
    write "mongo-$svc-keyfile" openssl rand -base64 756
    # The service's own database user, and the URL the service connects with.
    write "$svc-mongo-password" password
    # A kept URL that no longer carries the (re)generated password is rebuilt.
    if [ -e "$dir/$svc-mongo-url" ] \
        && ! grep -qF "$(cat "$dir/$svc-mongo-password")" "$dir/$svc-mongo-url"; then
        rm "$dir/$svc-mongo-url"
    fi
    write "$svc-mongo-url" mongo_url "$svc"
done

# The gateway's first token-signing key (RS256 needs RSA; 3072 bits per NIST SP 800-57 beyond 2030).
write gateway-signing-key.pem openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:3072
# Key-encryption key sealing the gateway's signing keys in its datastore (32 bytes, base64).
write gateway-signing-kek openssl rand -base64 32
# psychnotes' own consent-token signing key, deliberately not the gateway's (ES256, P-256).
write psychnotes-signing-key.pem openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256
# psychnotes' note-signing key ($sign's JWS; ES256, P-256), apart from its consent-token key.
write psychnotes-document-signing-key.pem openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256
# records' document-signing key (signed notes, CDex answers; ES256, P-256) and its separate client
# key for calling payers' $submit-attachment (SMART Backend Services, ES384, P-384).
write records-signing-key.pem openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256
write records-cdex-client-key.pem openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-384
# psychnotes' backend-client key (ES384, P-384): it asks records for care teams through the
# gateway; register its public half as client mindchart-psychnotes (README, the mindchart CLI).
write psychnotes-careteam-client.pem openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-384
# Key-encryption key for psychotherapy-note bodies: 32 random bytes, base64 text on one line.
write psychnotes-kek openssl rand -base64 32
# The revocation feed's secret: the gateway answers its feed only to callers presenting it, and
# records and psychnotes present it (one value; a copy per service, each mounts only its own).
write gateway-revocations-secret openssl rand -hex 32
for svc in records psychnotes; do
    if [ -e "$dir/$svc-revocations-secret" ] \
        && ! cmp -s "$dir/gateway-revocations-secret" "$dir/$svc-revocations-secret"; then
        rm "$dir/$svc-revocations-secret"  # a copy of an earlier value: copied again
    fi
    write "$svc-revocations-secret" cat "$dir/gateway-revocations-secret"
done

echo "secrets in $dir"
