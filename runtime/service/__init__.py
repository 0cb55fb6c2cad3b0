"""The device service: config, systemd notification, the kiosk server and the supervised loop."""
