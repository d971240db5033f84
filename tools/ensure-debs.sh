#!/bin/sh
# Installs the named Debian packages that are missing (as root), or prints the exact command.
missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "installing Debian packages:$missing" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; } >&2 || exit 1
else
  echo "missing Debian packages; run: sudo apt-get install$missing" >&2
  exit 1
fi
