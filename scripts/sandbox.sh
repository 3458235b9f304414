#!/usr/bin/env bash
# scripts/sandbox.sh - the OS sandbox of generated code (tasks/sandbox.py): bubblewrap, a dedicated
# unprivileged user for root harnesses, and an interpreter outside /root that user can run.
#
#   scripts/sandbox.sh setup   install what is missing (root: apt-get bubblewrap python3; the user),
#                              then check (default; idempotent, well under a second when ready)
#   scripts/sandbox.sh check   run one program in the sandbox as the harness will
#
# As root it installs (apt-get) bubblewrap and Debian's python3 and creates the system user
# decodebench-sandbox (no home, no login shell, no groups). As a normal user it installs nothing:
# bubblewrap must be there and unprivileged user namespaces enabled (kernel.unprivileged_userns_clone
# / user.max_user_namespaces); otherwise it says what is missing.
#
# Exit codes: 0 ready; 1 the sandbox cannot run here (why is printed); 3 cannot install (not root / no apt-get).
set -euo pipefail

USER_NAME=decodebench-sandbox
SYSTEM_PYTHON=/usr/bin/python3
say() { printf '[sandbox.sh] %s\n' "$*"; }

install_missing() {
  local packages=()
  command -v bwrap >/dev/null || packages+=(bubblewrap)
  [ -x "$SYSTEM_PYTHON" ] || packages+=(python3)
  if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
      say "missing: ${packages[*]}; install them (as root: apt-get install -y ${packages[*]})"; exit 3
    fi
    say "installing ${packages[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
  fi
  if [ "$(id -u)" -eq 0 ] && ! id -u "$USER_NAME" >/dev/null 2>&1; then
    say "creating the system user $USER_NAME"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group "$USER_NAME"
  fi
}

check() {
  # the harness's own check: a trivial program through run_program (as root: as decodebench-sandbox)
  local python=${DECODEBENCH_PYTHON:-.venv/bin/python}
  "$python" - <<'PY'
from decodebench.tasks.sandbox import SandboxUnavailableError, ensure_sandbox, run_program
try:
    interpreter = ensure_sandbox()
except SandboxUnavailableError as error:
    raise SystemExit(f"[sandbox.sh] {error}")
result = run_program("import os\nassert os.getuid() != 0\n")
if not result.passed:
    raise SystemExit(f"[sandbox.sh] a trivial program did not pass in the sandbox: {result.status} {result.detail}")
print(f"[sandbox.sh] ready: bubblewrap as {result.isolation['user']} (uid {result.isolation['uid']}), {interpreter}")
PY
}

case "${1:-setup}" in
  setup) install_missing; check ;;
  check) check ;;
  *) echo "usage: $0 [setup|check]" >&2; exit 2 ;;
esac
