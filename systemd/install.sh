#!/bin/sh
# Install anomaly-edge as a systemd service on this machine (Debian/Ubuntu/Jetson Linux). Run as root
# from a checkout:  sudo systemd/install.sh [station-name]
# - a system user `anomaly-edge` (group too), a venv in /opt/anomaly-edge/venv with this checkout,
# - /etc/anomaly-edge/<station>.yaml from configs/station.yaml if none exists (edit it, then enable),
# - the unit anomaly-edge@.service; state in /var/lib/anomaly-edge, API socket in /run/anomaly-edge.
set -eu
STATION="${1:-station-1}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/anomaly-edge

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
case "$STATION" in *[!A-Za-z0-9._-]*|"") echo "install.sh: bad station name '$STATION'" >&2; exit 1;; esac

getent group anomaly-edge >/dev/null || groupadd --system anomaly-edge
id anomaly-edge >/dev/null 2>&1 || useradd --system --gid anomaly-edge --groups video \
    --home-dir /var/lib/anomaly-edge --no-create-home --shell /usr/sbin/nologin anomaly-edge

mkdir -p "$PREFIX" /etc/anomaly-edge /var/lib/anomaly-edge
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet "$SRC"
cp -r "$SRC/docs" "$PREFIX/" 2>/dev/null || true
# Packs are built where torch is (make pack) and copied; the runtime never needs torch.
if [ -f "$SRC/packs/default/pack.yaml" ]; then
    mkdir -p "$PREFIX/packs" && rm -rf "$PREFIX/packs/default" && cp -r "$SRC/packs/default" "$PREFIX/packs/"
fi

CONF="/etc/anomaly-edge/$STATION.yaml"
if [ ! -e "$CONF" ]; then
    sed -e "s#^pack: .*#pack: $PREFIX/packs/default#" \
        -e "s#^state: .*#state: /var/lib/anomaly-edge/$STATION/state#" \
        -e "s#^  dir: .*#  dir: /var/lib/anomaly-edge/$STATION#" \
        -e "s#^  name: .*#  name: $STATION#" "$SRC/configs/station.yaml" > "$CONF"
    echo "wrote $CONF: set the source, MQTT broker and paths, then enroll good parts:"
    echo "  sudo -u anomaly-edge $PREFIX/venv/bin/anomaly-edge enroll --pack $PREFIX/packs/default --good DIR --out /var/lib/anomaly-edge/$STATION/state"
fi
chown -R anomaly-edge:anomaly-edge /var/lib/anomaly-edge
chmod 0640 "$CONF"; chgrp anomaly-edge "$CONF"

install -m 0644 "$SRC/systemd/anomaly-edge@.service" /etc/systemd/system/anomaly-edge@.service
systemctl daemon-reload
"$PREFIX/venv/bin/anomaly-edge" run --config "$CONF" --check || echo "fix $CONF before starting" >&2
echo "start with: systemctl enable --now anomaly-edge@$STATION"
