# Sourced by the .ci/setup.d scripts: ensure_packages LABEL PKG... installs the Debian packages not yet installed.
# Idempotent; without root it says what is missing and returns 0 (the tests needing them skip, saying why).
ensure_packages() {
  local label=$1 p status
  shift
  local missing=()
  for p in "$@"; do
    # capture, then match: with pipefail, `grep -q` closing the pipe early would fail dpkg-query with SIGPIPE
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "$label: missing Debian packages (need root to install): ${missing[*]}" >&2
    return 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
