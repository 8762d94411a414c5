#!/usr/bin/env bash
# System packages for the JupyterLab browser test (tests/test_lab.py): Debian's Chromium, driven headless by
# Playwright (Playwright's own browser download is not used), and a Korean font so the persona text in the
# screenshots is legible. Installs only what is missing, only as root with apt-get; otherwise it says so once and
# does nothing (the browser test then skips and names the reason). It never fails the calling `make test`.
packages=(chromium chromium-driver fonts-nanum)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] not installing ${missing[*]} (needs root and apt-get); the browser test skips without /usr/bin/chromium"
  exit 0
fi
echo "[install_browser] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "[install_browser] apt-get could not install ${missing[*]}; the browser test skips without /usr/bin/chromium" >&2
fi
rm -f "$log"
exit 0
