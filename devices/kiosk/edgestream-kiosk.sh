#!/bin/sh
# Open the edgestream page full screen once the service is up (run by the desktop session's
# autostart; see devices/README.md). The service runs as a system unit and the browser in the
# logged-in kiosk session, so the browser waits for /healthz instead of a unit dependency.
URL=${EDGESTREAM_URL:-http://127.0.0.1:8765/}
i=0
until curl -fsS -o /dev/null --max-time 2 "${URL}healthz"; do
  i=$((i + 1))
  [ "$i" -lt 600 ] || break  # after 10 minutes show the page anyway: it says "reconnecting"
  sleep 1
done
for browser in chromium chromium-browser google-chrome; do
  command -v "$browser" >/dev/null && break
done
exec "$browser" --kiosk --noerrdialogs --disable-infobars --no-first-run \
  --disable-session-crashed-bubble --check-for-update-interval=31536000 \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="${XDG_CACHE_HOME:-$HOME/.cache}/edgestream-kiosk" "$URL"
