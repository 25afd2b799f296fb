#!/usr/bin/env bash
# Idempotent SoftHSM token set-up for keybroker, for operators who prefer
# the SoftHSM tools to `keybroker init` (which does the same through PKCS#11).
#
#   hsm/setup-token.sh [DATA_DIR] [TOKEN_LABEL]
#
# Writes DATA_DIR/hsm/softhsm2.conf from the template, random PINs into
# DATA_DIR/hsm/{user,so}.pin (mode 0600) unless they exist, and initialises
# the token unless one with the label exists. Prints the export line for
# SOFTHSM2_CONF.
set -euo pipefail
data=${1:-var}
label=${2:-keybroker}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$data/hsm/tokens"
tokendir=$(cd "$data/hsm/tokens" && pwd)
conf="$data/hsm/softhsm2.conf"
[ -f "$conf" ] || sed "s|@TOKENDIR@|$tokendir|" "$here/softhsm2.conf.template" > "$conf"
export SOFTHSM2_CONF=$(cd "$(dirname "$conf")" && pwd)/softhsm2.conf
umask 077
for pin in user so; do
  [ -s "$data/hsm/$pin.pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$data/hsm/$pin.pin"
done
if softhsm2-util --show-slots | grep -q "Label:[[:space:]]*$label\$"; then
  echo "token '$label' exists"
else
  softhsm2-util --init-token --free --label "$label" \
    --so-pin "$(cat "$data/hsm/so.pin")" --pin "$(cat "$data/hsm/user.pin")" >/dev/null
  echo "token '$label' initialised"
fi
echo "export SOFTHSM2_CONF=$SOFTHSM2_CONF"
