#!/usr/bin/env bash
# The README's first command: install everything (scripts/setup.sh), then run `pyovpn demo`:
# two network namespaces, a pyovpn tunnel between them, and pings through it. Needs root.
# Extra arguments go to `pyovpn demo` (e.g. --cipher CHACHA20-POLY1305 --proto tcp --keep-logs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# Same interpreter rule as scripts/setup.sh: its .venv if it made one, else python3.
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
exec "$PY" -m pyovpn demo "$@"
