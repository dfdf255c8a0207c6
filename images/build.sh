#!/usr/bin/env bash
# `make image`: builds kuberank's container images without a Docker daemon or a registry and
# writes one archive per image, build/images/<name>-<tag>.tar (docker-archive: `podman load`,
# `docker load`). See docs/operations.md, "Build the images".
#
#   IMAGES    which to build (default: "kuberank triton-local")
#   VARIANT   cpu (default) or cuda: the torch build inside the kuberank image
#   BASE      base image; default python:3.11-slim-bookworm when it can be pulled, otherwise a
#             Debian bookworm + Python 3.11 base made here with debootstrap from apt's mirror
#   PYTHON    interpreter that builds the kuberank wheel (default: .venv/bin/python, python3)
#   KUBERANK_CA_BUNDLE   CA bundle for pip inside the build (default: pip's own `cert`)
#   KUBERANK_IMAGE_STORAGE  containers/storage root (default: build/containers)
#
# Cached: an image whose inputs (Containerfile, requirements, sources, base, variant) are
# unchanged since its archive was written is not rebuilt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${KUBERANK_IMAGE_OUT:-$ROOT/build/images}
STORAGE=${KUBERANK_IMAGE_STORAGE:-$ROOT/build/containers}
IMAGES=${IMAGES:-kuberank triton-local}
VARIANT=${VARIANT:-cpu}
UPSTREAM_BASE=docker.io/library/python:3.11-slim-bookworm
LOCAL_BASE=localhost/kuberank-base:bookworm
TAG=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/charts/kuberank/Chart.yaml")

say() { printf 'make image: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

[ -n "$TAG" ] || die "no appVersion in charts/kuberank/Chart.yaml"
case "$VARIANT" in cpu|cuda) ;; *) die "VARIANT=$VARIANT: expected cpu or cuda" ;; esac
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

# --- the builder ----------------------------------------------------------------------------
STORE_OPTS=(--root "$STORAGE/storage" --runroot "$STORAGE/run" --storage-driver vfs)
if command -v buildah >/dev/null 2>&1; then
  TOOL=buildah
  builder() { buildah "${STORE_OPTS[@]}" "$@"; }
elif command -v podman >/dev/null 2>&1; then
  TOOL=podman
  builder() { podman "${STORE_OPTS[@]}" "$@"; }
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  TOOL=docker
  builder() { docker "$@"; }
else
  die "no container builder: install buildah (Debian: apt-get install buildah podman runc debootstrap), or podman, or run a Docker daemon"
fi
images_tool() {  # podman for import/exists where buildah lacks them; same storage
  if [ "$TOOL" = docker ]; then docker "$@"; else podman "${STORE_OPTS[@]}" "$@"; fi
}
if [ "$TOOL" != docker ] && ! command -v podman >/dev/null 2>&1; then
  die "podman not found (Debian: apt-get install podman): it imports the base and checks images"
fi

# --- pip inside the build: the machine's CA bundle and pip configuration, as secrets --------
pip_value() {  # the first value pip's configuration gives KEY (env, user, global files)
  "$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | head -n 1
}
CA=${KUBERANK_CA_BUNDLE:-${PIP_CERT:-$(pip_value cert)}}
if [ -z "$CA" ]; then
  for c in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [ -f "$c" ] && CA=$c && break
  done
fi
[ -n "$CA" ] || die "no CA bundle found for pip inside the build: set KUBERANK_CA_BUNDLE"
[ -r "$CA" ] || die "CA bundle $CA: no such readable file (set KUBERANK_CA_BUNDLE)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kuberank-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# The index, extra indexes and find-links pip uses here; local (file://) ones are mounted
# read-only into the build at the same paths.
PIPCONF=$WORK/pip.conf
VOLUMES=()
{
  echo "[global]"
  for key in index-url extra-index-url find-links timeout default-timeout; do
    value=$(pip_value "$key")
    [ -n "$value" ] && echo "$key = $value"
    if [ "$key" = extra-index-url ] || [ "$key" = find-links ] || [ "$key" = index-url ]; then
      for loc in $value; do
        dir=${loc#file://}
        if [ -d "$dir" ]; then
          # an index page links its files with ../../files/: mount the index's parent
          case "$dir" in */simple|*/simple/) dir=$(dirname "${dir%/}") ;; esac
          VOLUMES+=(-v "$dir:$dir:ro")
        fi
      done
    fi
  done
} >"$PIPCONF"

# --- the base ---------------------------------------------------------------------------------
apt_mirror() {  # the first Debian mirror in apt's sources (deb822 or one-line format)
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ {print $2; exit}' "$f" | grep -v security && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' "$f" |
      grep -v security && return 0
  done
  return 1
}

make_base() {
  if [ -n "${BASE:-}" ]; then echo "$BASE"; return; fi
  if images_tool image exists "$UPSTREAM_BASE" 2>/dev/null; then echo "$UPSTREAM_BASE"; return; fi
  if images_tool image exists "$LOCAL_BASE" 2>/dev/null; then echo "$LOCAL_BASE"; return; fi
  if builder pull "$UPSTREAM_BASE" >"$WORK/pull.log" 2>&1; then echo "$UPSTREAM_BASE"; return; fi
  say "cannot pull $UPSTREAM_BASE ($(tail -n 1 "$WORK/pull.log")); making an equal base with debootstrap"
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (Debian: apt-get install debootstrap)"
  local mirror
  mirror=$(apt_mirror) || die "no Debian mirror in /etc/apt/sources.list{,.d}: cannot debootstrap"
  local rootfs=$WORK/rootfs
  say "debootstrap bookworm from apt's mirror (minbase + python3.11)"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,libpython3.11,ca-certificates,netbase,tzdata \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
    die "debootstrap failed: $(tail -n 3 "$WORK/debootstrap.log")"
  # as slim images do: no apt lists or caches in the base
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | images_tool import --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  echo "$LOCAL_BASE"
}

# --- inputs and cache -------------------------------------------------------------------------
context_kuberank() {  # context dir: Containerfile, requirements.txt (from pyproject), the wheel
  local ctx=$WORK/ctx-kuberank
  mkdir -p "$ctx"
  cp "$ROOT/images/kuberank/Containerfile" "$ctx/"
  "$PYTHON" - "$ROOT/pyproject.toml" >"$ctx/requirements.txt" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch==")))
PY
  "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$ctx" "$ROOT" >"$WORK/wheel.log" 2>&1 ||
    die "building the kuberank wheel failed: $(tail -n 3 "$WORK/wheel.log")"
  echo "$ctx"
}

inputs_kuberank() {
  (cd "$ROOT" && git ls-files -co --exclude-standard -- pyproject.toml kuberank components serving pipelines images/build.sh images/kuberank |
    xargs -d '\n' -r sha256sum | sha256sum | cut -c1-16)
}
inputs_triton-local() {
  (cd "$ROOT" && sha256sum images/build.sh images/triton/Containerfile.local images/triton/requirements.txt | sha256sum | cut -c1-16)
}
context_triton-local() {
  local ctx=$WORK/ctx-triton
  mkdir -p "$ctx"
  cp "$ROOT/images/triton/Containerfile.local" "$ROOT/images/triton/requirements.txt" "$ctx/"
  echo "$ctx"
}

build_one() {
  local name=$1 base=$2 ref archive key stamp ctx start
  ref=localhost/kuberank-$name:$TAG
  [ "$name" = kuberank ] && ref=localhost/kuberank:$TAG
  archive=$OUT/$name-$TAG.tar
  stamp=$archive.inputs
  key="$("inputs_$name") base=$(images_tool image inspect --format '{{.Id}}' "$base" 2>/dev/null | cut -c1-16) variant=$VARIANT"
  if [ -f "$archive" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    say "$name: up to date ($archive, $(du -m "$archive" | cut -f1) MB)"
    return
  fi
  start=$(date +%s)
  ctx=$("context_$name")
  local file=$ctx/Containerfile
  [ "$name" = triton-local ] && file=$ctx/Containerfile.local
  say "$name: building $ref on $base with $TOOL"
  local args=(--file "$file" --tag "$ref" --build-arg "BASE=$base" --build-arg "VARIANT=$VARIANT"
    --secret "id=ca,src=$CA" --secret "id=pipconf,src=$PIPCONF")
  if [ "$TOOL" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "${args[@]}" --network host "$ctx" || die "$name: build failed"
  else
    # One layer on the base: on vfs storage (no overlay here) every intermediate layer is a
    # full copy of the image. Rebuilds are skipped by the inputs check above instead.
    local bud=(bud --isolation chroot --network host "${VOLUMES[@]}")
    [ "$TOOL" = podman ] && bud=(build --isolation chroot --network host "${VOLUMES[@]}")
    builder "${bud[@]}" "${args[@]}" "$ctx" >&2 || die "$name: build failed"
  fi
  mkdir -p "$OUT"
  rm -f "$archive" "$stamp"
  # written beside, renamed when complete: a failed export leaves no partial archive
  if [ "$TOOL" = docker ]; then
    docker save -o "$archive.part" "$ref" || { rm -f "$archive.part"; die "$name: export failed"; }
  else
    builder push --quiet "$ref" "docker-archive:$archive.part:$ref" >/dev/null ||
      { rm -f "$archive.part"; die "$name: export failed"; }
  fi
  mv "$archive.part" "$archive"
  echo "$key" >"$stamp"
  # the image this one replaced is left untagged: on vfs it is a full copy, so drop it
  [ "$TOOL" = docker ] || images_tool image prune --force >/dev/null 2>&1 || true
  say "$name: $archive ($(du -m "$archive" | cut -f1) MB, built in $(( $(date +%s) - start )) s)"
}

mkdir -p "$STORAGE" "$OUT"
BASE_REF=$(make_base)
for name in $IMAGES; do
  case "$name" in kuberank|triton-local) ;; *) die "IMAGES: unknown image $name (kuberank, triton-local)" ;; esac
  build_one "$name" "$BASE_REF"
done
