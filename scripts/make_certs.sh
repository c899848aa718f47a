#!/usr/bin/env bash
# Make a local certificate authority and a SuperLink certificate signed by it, for testing TLS
# between SuperNodes / the flwr CLI and the SuperLink. Not for production: use your
# organisation's CA there.
#
#   scripts/make_certs.sh OUT_DIR [HOST ...]
#
# HOSTs are the names or IP addresses SuperNodes use to reach the SuperLink; 127.0.0.1 and
# localhost are always included. Writes OUT_DIR/ca.crt (give it to every SuperNode and CLI user),
# OUT_DIR/server.pem and OUT_DIR/server.key (SuperLink only), and the CA's key OUT_DIR/ca.key.
set -euo pipefail

out=${1:?usage: make_certs.sh OUT_DIR [HOST ...]}
shift || true
mkdir -p "$out"
cd "$out"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
  [[ -z "$host" ]] && continue
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
    sans="$sans,IP:$host"
  else
    sans="$sans,DNS:$host"
  fi
done

openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -sha256 -days 365 \
  -subj "/O=fedcollm test CA/CN=fedcollm-ca" -out ca.crt

openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/O=fedcollm/CN=superlink" -out server.csr
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $sans
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out server.pem -days 365 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "certificates in $(pwd): ca.crt (share), server.pem + server.key (SuperLink), ca.key (keep)"
