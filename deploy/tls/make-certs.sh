#!/usr/bin/env bash
# Generate a private CA, a coordinator (server) certificate, client certificates and per-client
# bearer tokens for gradcomp's gRPC TLS / mutual TLS. Nothing here is committed: run it, keep the
# output out of git, and load it into the cluster as Secrets (the commands are printed at the end).
#
# Usage:
#   deploy/tls/make-certs.sh [-o OUT_DIR] [-n SERVER_NAME]... [-i SERVER_IP]... [-c CLIENTS] [-d DAYS] [-f]
#
#   -o OUT_DIR      where to write the files (default: deploy/tls/out, which git ignores)
#   -n SERVER_NAME  DNS name the clients dial, repeatable
#                   (default: localhost, gradcomp-coordinator, gradcomp-coordinator.gradcomp.svc,
#                    gradcomp-coordinator.gradcomp.svc.cluster.local)
#   -i SERVER_IP    IP address the clients dial, repeatable (default: 127.0.0.1)
#   -c CLIENTS      how many client certificates, client-0 .. client-(N-1) (default: 3)
#   -d DAYS         validity in days (default: 365)
#   -f              overwrite existing files in OUT_DIR (default: refuse)
#
# Output: ca.crt ca.key server.crt server.key client-<i>.crt client-<i>.key client-<i>.token
#         tokens.txt (the coordinator's server.tokens_file: one 'client-<i> <token> client-<i>' per line:
#         name, token, and the certificate CN the token is bound to under mutual TLS)
# Keys are EC P-256, files written with mode 0600. The server certificate also allows clientAuth
# so the coordinator's own health probe can pass mutual TLS. ca.key is only needed to sign more
# certificates: keep it offline.
set -euo pipefail

out="$(cd "$(dirname "$0")" && pwd)/out"
clients=3
days=365
force=0
names=()
ips=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while getopts ":o:n:i:c:d:fh" opt; do
  case "$opt" in
    o) out="$OPTARG" ;;
    n) names+=("$OPTARG") ;;
    i) ips+=("$OPTARG") ;;
    c) clients="$OPTARG" ;;
    d) days="$OPTARG" ;;
    f) force=1 ;;
    h) usage; exit 0 ;;
    :) echo "make-certs.sh: -$OPTARG needs a value" >&2; exit 2 ;;
    *) echo "make-certs.sh: unknown option -$OPTARG (see -h)" >&2; exit 2 ;;
  esac
done

command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found on PATH" >&2; exit 2; }
[[ "$clients" =~ ^[0-9]+$ ]] || { echo "make-certs.sh: -c must be a whole number, got '$clients'" >&2; exit 2; }
[[ "$days" =~ ^[1-9][0-9]*$ ]] || { echo "make-certs.sh: -d must be a positive number of days, got '$days'" >&2; exit 2; }
if [[ ${#names[@]} -eq 0 ]]; then
  names=(localhost gradcomp-coordinator gradcomp-coordinator.gradcomp.svc gradcomp-coordinator.gradcomp.svc.cluster.local)
fi
if [[ ${#ips[@]} -eq 0 ]]; then
  ips=(127.0.0.1)
fi

umask 077
mkdir -p "$out"
if [[ $force -eq 0 ]] && compgen -G "$out/*.key" >/dev/null; then
  echo "make-certs.sh: $out already holds keys; use -f to overwrite or -o for another directory" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# Certificate authority.
newkey "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/O=gradcomp/CN=gradcomp CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$out/ca.crt"

# sign NAME CN EXTFILE: issue NAME.crt for NAME.key from the CA.
sign() {
  local name="$1" cn="$2" ext="$3"
  newkey "$out/$name.key"
  openssl req -new -key "$out/$name.key" -subj "/O=gradcomp/CN=$cn" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$ext" -out "$out/$name.crt" 2>/dev/null
}

# Coordinator: serverAuth with every name and IP the clients may dial.
san=""
for n in "${names[@]}"; do san+="${san:+,}DNS:$n"; done
for ip in "${ips[@]}"; do san+="${san:+,}IP:$ip"; done
cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
authorityKeyIdentifier=keyid
EXT
sign server "${names[0]}" "$tmp/server.ext"

# Clients: clientAuth, one certificate per participant (mutual TLS).
cat >"$tmp/client.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
authorityKeyIdentifier=keyid
EXT
: >"$out/tokens.txt"
for ((i = 0; i < clients; i++)); do
  sign "client-$i" "client-$i" "$tmp/client.ext"
  token="$(openssl rand -hex 32)"
  printf '%s' "$token" >"$out/client-$i.token"
  printf 'client-%d %s client-%d\n' "$i" "$token" "$i" >>"$out/tokens.txt"
done

# umask 077 made every key and token 0600; certificates are public.
chmod 644 "$out"/*.crt
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null

cat <<MSG
wrote $out: ca.crt server.crt/.key and $clients client certificate(s); server names: ${names[*]} ${ips[*]}
Load them into Kubernetes (namespace gradcomp; names used by deploy/k8s) with:
  kubectl -n gradcomp create secret generic gradcomp-server-tls --from-file=ca.crt=$out/ca.crt \\
    --from-file=tls.crt=$out/server.crt --from-file=tls.key=$out/server.key
  kubectl -n gradcomp create secret generic gradcomp-tokens --from-file=tokens.txt=$out/tokens.txt
  kubectl -n gradcomp create secret generic gradcomp-clients --from-file=ca.crt=$out/ca.crt \\
    \$(for i in \$(seq 0 $((clients - 1))); do printf -- '--from-file=%s ' $out/client-\$i.crt $out/client-\$i.key $out/client-\$i.token; done)
MSG
