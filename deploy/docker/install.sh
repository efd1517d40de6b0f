#!/usr/bin/env bash
# Every install step of attrserve's container image (deploy/docker/Dockerfile), one phase per RUN:
#
#   install.sh app SRC VENV          a virtualenv VENV made with $VENV_PYTHON (default: python3.11), holding
#                                    torch==2.13.0 and attrserve + attrserve-client built from the source tree SRC
#                                    (not editable), and VENV/healthcheck.py. Runs as any user, anywhere:
#                                    tests/deploy/test_docker_install.py runs it into a temporary folder on the host.
#                                    TORCH_INDEX_URL, when set and not empty, is the only index torch is taken
#                                    from (the CPU image sets PyTorch's CPU index); otherwise pip's own settings.
#   install.sh python VERSION DEST   (CUDA image, as root) CPython VERSION from python-build-standalone, put in
#                                    DEST with `uv python install` (uv must be on PATH): DEST/bin/python3.11.
#   install.sh user                  (as root) the unprivileged user and group attrserve, uid/gid 10001, and the
#                                    /models mount point.
#   install.sh malloc                (as root) tcmalloc from the distribution (Debian: libtcmalloc-minimal4, Ubuntu
#                                    24.04: libtcmalloc-minimal4t64), which `attrserve serve --allocator auto` preloads
#                                    into the engine process (bench/RESULTS.md, issue 12 step 11).
#
# torch is pinned here as in pyproject.toml (a test keeps the two equal) and installed first, alone, so that no
# later step can pull another build: `==2.13.0` also matches the local-version builds 2.13.0+cpu and +cuXXX.
set -euo pipefail

TORCH_VERSION=2.13.0
ATTRSERVE_UID=10001

die() {
  echo "install.sh: $*" >&2
  exit 2
}

phase_app() {
  [ $# -eq 2 ] || die "usage: install.sh app SRC VENV"
  local src venv python
  src=$(cd "$1" && pwd)
  venv=$2
  python=${VENV_PYTHON:-python3.11}
  [ -f "$src/pyproject.toml" ] && [ -f "$src/clients/python/pyproject.toml" ] || die "$src is not attrserve's source tree"

  "$python" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install --no-input --disable-pip-version-check)
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
  else
    "${pip[@]}" "torch==$TORCH_VERSION"
  fi
  # The pin again on this line, so the resolver keeps the torch just installed.
  "${pip[@]}" "torch==$TORCH_VERSION" "$src/clients/python" "$src"
  "$venv/bin/python" -m pip check
  install -m 0644 "$src/deploy/docker/healthcheck.py" "$venv/healthcheck.py"
  # Fails the build at once if the entry point or its imports are broken.
  "$venv/bin/attrserve" serve --help >/dev/null
}

phase_python() {
  [ $# -eq 2 ] || die "usage: install.sh python VERSION DEST"
  local version=$1 dest=$2 tmp
  command -v uv >/dev/null || die "uv is not on PATH"
  tmp=$(mktemp -d)
  # --no-bin: no python3.x links in ~/.local/bin; the interpreter is used by its path, DEST/bin/python3.11.
  UV_PYTHON_INSTALL_DIR="$tmp" uv python install --no-cache --no-bin "$version"
  local built=("$tmp"/cpython-"$version"-linux-*)
  [ ${#built[@]} -eq 1 ] && [ -d "${built[0]}" ] || die "uv did not install CPython $version"
  mkdir -p "$(dirname "$dest")"
  mv "${built[0]}" "$dest" # python-build-standalone's installs are relocatable
  rm -rf "$tmp"
  "$dest/bin/python3.11" -c 'import ssl, sqlite3, venv, ensurepip, sys; print(sys.version)'
}

phase_user() {
  [ $# -eq 0 ] || die "usage: install.sh user"
  groupadd --gid "$ATTRSERVE_UID" attrserve
  useradd --uid "$ATTRSERVE_UID" --gid "$ATTRSERVE_UID" --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --no-log-init attrserve
  # The model repository's mount point; the models are mounted read-only over it.
  install -d -m 0755 -o root -g root /models
}

phase_malloc() {
  [ $# -eq 0 ] || die "usage: install.sh malloc"
  local package=libtcmalloc-minimal4
  # Ubuntu 24.04 renamed its libraries for the 64-bit time_t transition.
  if grep -q '^VERSION_CODENAME=noble$' /etc/os-release; then
    package=libtcmalloc-minimal4t64
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package"
  rm -rf /var/lib/apt/lists/*
  ldconfig -p | grep -q 'libtcmalloc_minimal\.so\.4 ' || die "$package did not install libtcmalloc_minimal.so.4"
}

[ $# -ge 1 ] || die "usage: install.sh {app SRC VENV | python VERSION DEST | user | malloc}"
phase=$1
shift
case "$phase" in
app) phase_app "$@" ;;
python) phase_python "$@" ;;
user) phase_user "$@" ;;
malloc) phase_malloc "$@" ;;
*) die "unknown phase $phase (app, python, user or malloc)" ;;
esac
