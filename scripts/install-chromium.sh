#!/usr/bin/env bash
# Install Debian's chromium for the report's browser test (tests/test_report.py), if it is missing.
# Needs root on Debian 12 (apt-get); idempotent: does nothing when the package is installed.
# Usage: scripts/install-chromium.sh
set -euo pipefail
PACKAGES=(chromium)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-chromium: ${missing[*]} missing; run as root (apt-get install -y ${missing[*]})" >&2
    exit 1
fi
echo "install-chromium: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}"
