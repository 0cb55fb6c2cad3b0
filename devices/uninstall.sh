#!/usr/bin/env bash
# Remove the edgestream service. Config, bundles and the user stay unless --purge.
#   sudo bash devices/uninstall.sh [--purge] [--root DIR]
set -euo pipefail
root=/ purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --purge) purge=1; shift ;;
    *) echo "uninstall.sh: unknown option $1 (use --purge, --root DIR)" >&2; exit 2 ;;
  esac
done
root=${root%/}
unit=/etc/systemd/system/edgestream.service
if [ -z "$root" ]; then
  systemctl disable --now -q edgestream.service 2>/dev/null || true
else
  rm -f "$root/etc/systemd/system/multi-user.target.wants/edgestream.service"
fi
rm -f "$root$unit" "$root/etc/xdg/autostart/edgestream-kiosk.desktop"
[ -n "$root" ] || systemctl daemon-reload
rm -rf "$root/opt/edgestream"
if [ "$purge" -eq 1 ]; then
  rm -rf "$root/etc/edgestream" "$root/var/lib/edgestream" "$root/var/cache/edgestream" "$root/var/log/edgestream"
  prefix=(); [ -z "$root" ] || prefix=(--prefix "$root")
  ! grep -q '^edgestream:' "$root/etc/passwd" || userdel "${prefix[@]}" edgestream
fi
echo "uninstall: edgestream removed${purge:+}$([ "$purge" -eq 1 ] && echo ' (config, bundles and user too)' || echo '; config and bundles kept (use --purge)')" >&2
