#!/usr/bin/env bash
# A private CA and a certificate for each stage and for one client, with openssl: for a single machine, tests and
# trying TLS out. On Kubernetes issue them with cert-manager instead (deploy/README.md).
#
#   deploy/tls/make-certs.sh DIR [NAME...]      (default names: rag assemble inference post stream client)
#
# Each NAME gets NAME.pem (its certificate, signed by DIR/ca.pem) and NAME.key. A certificate names its stage as a
# DNS SAN (callers check it), plus localhost and 127.0.0.1 so clients on this machine can check the edge; add the
# edge's public names with EXTRA_SANS="DNS:mesh.example.com,IP:203.0.113.7". An existing CA in DIR is reused, so
# certificates can be re-issued (rotated) without touching the others. DAYS sets the validity (default 365);
# CA_DIR=OTHER signs with another directory's CA. Keys are written owner-only.
set -euo pipefail

dir=${1:?usage: make-certs.sh DIR [NAME...]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(rag assemble inference post stream client)
days=${DAYS:-365}
ca_dir=${CA_DIR:-$dir}
mkdir -p "$dir" "$ca_dir"
umask 077

if [ ! -f "$ca_dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.pem" -subj "/CN=prompt-orchestrator CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$ca_dir/ca.pem"
fi

for name in "${names[@]}"; do
  sans="DNS:$name,DNS:localhost,IP:127.0.0.1${EXTRA_SANS:+,$EXTRA_SANS}"
  ext=$(mktemp)
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' "$sans" >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/$name.key" -out "$dir/$name.csr" \
    -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$ca_dir/ca.pem" -CAkey "$ca_dir/ca.key" -CAcreateserial \
    -days "$days" -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
  chmod 644 "$dir/$name.pem"
  rm -f "$dir/$name.csr" "$ext"
done
[ "$ca_dir" = "$dir" ] || cp "$ca_dir/ca.pem" "$dir/ca.pem"
echo "certificates for ${names[*]} in $dir (CA: $ca_dir/ca.pem)"
