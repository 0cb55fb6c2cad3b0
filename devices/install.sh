#!/usr/bin/env bash
# Install edgestream as a systemd service. Idempotent: a second run changes nothing.
#
#   sudo bash devices/install.sh [--bundle DIR] [--extras cpu,mic] [--kiosk] [--no-start]
#   bash devices/install.sh --root /tmp/scratch ...   # into a scratch root (tests, images)
#
# Puts: system user `edgestream` (groups audio, and video where it exists: Jetson GPUs),
# /opt/edgestream/venv (the project, not editable), /etc/edgestream/config.toml (never
# overwritten), /var/lib/edgestream/bundles/NAME (from --bundle), /var/cache/edgestream,
# /etc/systemd/system/edgestream.service, enabled; with --kiosk, a desktop autostart entry that
# opens the page full screen in Chromium once the service is up. On a GPU machine pass --extras gpu,mic
# (on Jetson install NVIDIA's onnxruntime-gpu wheel into the venv first: see devices/README.md).
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=/ bundle="" extras="cpu,mic" start=1 kiosk=0 pip_args=() python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --bundle) bundle=$2; shift 2 ;;
    --extras) extras=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    --kiosk) kiosk=1; shift ;;
    --pip-arg) pip_args+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
root=${root%/}
say() { echo "install: $*" >&2; }
[ "$root" != "" ] || [ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo), or give --root DIR" >&2; exit 1; }
[ -z "$bundle" ] || [ -f "$bundle/manifest.json" ] || {
  echo "install.sh: --bundle $bundle: no manifest.json there; export one with 'edgestream export'" >&2; exit 2; }
prefix=(); [ -z "$root" ] || prefix=(--prefix "$root")

# put SRC DEST MODE: copy only when different, so a rerun keeps every file and its time
put() {
  if ! cmp -s "$1" "$root$2" || [ "$(stat -c %a "$root$2")" != "$3" ]; then
    install -D -m "$3" "$1" "$root$2"; say "wrote $2"
  fi
}
dir() {  # dir PATH MODE OWNER
  [ -d "$root$1" ] || { mkdir -p "$root$1"; say "made $1"; }
  [ "$(stat -c %a "$root$1")" = "$2" ] || chmod "$2" "$root$1"
  [ "$(stat -c %U:%G "$root$1")" = "$3" ] || [ "$(stat -c %u:%g "$root$1")" = "$3" ] || chown "$3" "$root$1"
}

# 1. the user: system account, no login, in audio (and video for NVIDIA's Jetson devices)
grep -q '^audio:' "$root/etc/group" || { groupadd "${prefix[@]}" --system audio; say "added group audio"; }
if ! grep -q '^edgestream:' "$root/etc/passwd"; then
  groups=audio; grep -q '^video:' "$root/etc/group" && groups=audio,video
  useradd "${prefix[@]}" --system --user-group --groups "$groups" --home-dir /var/lib/edgestream \
    --no-create-home --shell /usr/sbin/nologin --comment "edgestream service" edgestream
  say "added user edgestream ($groups)"
fi
uid=$(awk -F: '$1=="edgestream"{print $3}' "$root/etc/passwd")
gid=$(awk -F: '$1=="edgestream"{print $3}' "$root/etc/group")

# 2. folders: state and caches belong to the service user; config is read-only for it
dir /opt/edgestream 755 0:0
dir /etc/edgestream 750 "0:$gid"
dir /var/lib/edgestream 750 "$uid:$gid"
dir /var/lib/edgestream/bundles 750 "$uid:$gid"
dir /var/cache/edgestream 750 "$uid:$gid"
dir /var/log/edgestream 750 "$uid:$gid"

# 3. the virtual environment: reinstalled only when the project's sources changed
venv=/opt/edgestream/venv
stamp=$( (cd "$src" && cat pyproject.toml && find runtime devices -type f \( -name '*.py' -o -name '*.html' -o -name '*.json' -o -name '*.toml' \) | sort | xargs cat) | sha256sum | cut -c1-16)-$extras
[ -x "$root$venv/bin/python" ] || { "$python" -m venv "$root$venv"; say "made $venv"; }
if [ "$(cat "$root$venv/.edgestream-installed" 2>/dev/null)" != "$stamp" ]; then
  "$root$venv/bin/python" -m pip install -q --disable-pip-version-check "${pip_args[@]}" "$src[$extras]"
  echo "$stamp" > "$root$venv/.edgestream-installed"
  say "installed edgestream[$extras] into $venv"
fi

# 4. config (never overwritten: it is the operator's), unit, bundle
if [ ! -f "$root/etc/edgestream/config.toml" ]; then
  config=$(cat "$src/devices/config.toml")
  if [ -n "$bundle" ]; then  # the first install points the config at the bundle it copies
    config=$(sed "s|^bundle = .*|bundle = \"/var/lib/edgestream/bundles/$(basename "$(cd "$bundle" && pwd)")\"|" <<<"$config")
  fi
  printf '%s\n' "$config" > "$root/etc/edgestream/config.toml.new"
  chown "0:$gid" "$root/etc/edgestream/config.toml.new" && chmod 640 "$root/etc/edgestream/config.toml.new"
  mv "$root/etc/edgestream/config.toml.new" "$root/etc/edgestream/config.toml"
  say "wrote /etc/edgestream/config.toml"
fi
put "$src/devices/edgestream.service" /etc/systemd/system/edgestream.service 644
# the kiosk browser launcher; autostart only with --kiosk (a headless device needs no browser)
put "$src/devices/kiosk/edgestream-kiosk.sh" /opt/edgestream/kiosk/edgestream-kiosk.sh 755
[ "$kiosk" -eq 0 ] || put "$src/devices/kiosk/edgestream-kiosk.desktop" \
  /etc/xdg/autostart/edgestream-kiosk.desktop 644
if [ -n "$bundle" ]; then
  name=$(basename "$(cd "$bundle" && pwd)")
  dest=/var/lib/edgestream/bundles/$name
  if ! diff -rq "$bundle" "$root$dest" >/dev/null 2>&1; then
    rm -rf "$root$dest.new" && cp -r "$bundle" "$root$dest.new"
    chown -R "$uid:$gid" "$root$dest.new" && rm -rf "$root$dest" && mv "$root$dest.new" "$root$dest"
    say "copied bundle to $dest (set bundle = \"$dest\" in /etc/edgestream/config.toml)"
  fi
fi

# 5. enable (and start, on the real machine)
if [ -z "$root" ]; then
  systemctl daemon-reload
  systemctl is-enabled -q edgestream.service || systemctl enable -q edgestream.service
  [ "$start" -eq 0 ] || systemctl restart edgestream.service
  say "edgestream.service enabled; journalctl -u edgestream -f shows its log"
else
  [ -L "$root/etc/systemd/system/multi-user.target.wants/edgestream.service" ] ||
    systemctl --root="$root" enable -q edgestream.service
fi
