#!/usr/bin/env bash
# Writes a single-layer container image as a docker-archive tar (the format of `docker save`),
# which `ctr -n k8s.io images import` (containerd 1.6) and `docker load` accept.
#
# usage: make-image-tar.sh ROOTFS_DIR IMAGE_REF OUT_TAR ENTRYPOINT_JSON CMD_JSON [USER]
#   ROOTFS_DIR       directory whose contents become the image's only layer
#   IMAGE_REF        full reference to tag the image with, e.g. localhost/clusterctl/pause:3.4
#   ENTRYPOINT_JSON  JSON array or null, e.g. '["/pause"]'
#   CMD_JSON         JSON array or null
#   USER             optional user (e.g. 65535:65535)
# MAKE_IMAGE_BASE=ARCHIVE (optional): a docker-archive of one image made by this script whose
# layers go under ROOTFS_DIR's (as `FROM` does), byte for byte: archives merged with
# MAKE_IMAGE_MERGE store the shared layer once.
# MAKE_IMAGE_MERGE=1: then the arguments are OUT_TAR ARCHIVE...: one docker-archive holding every
# image of the ARCHIVEs (manifest.json entries concatenated, layers stored once by diff_id).
#
# Output is reproducible: file times are SOURCE_DATE_EPOCH (default 0), owners are 0:0.
#
# Layout written:
#   manifest.json               [{"Config": "<hex>.json", "RepoTags": [REF], "Layers": ["<hex>/layer.tar"]}]
#   <hex>.json                  image config: architecture, os, config, rootfs.diff_ids, history
#   <diffid-hex>/layer.tar      uncompressed layer; its sha256 is the diff_id
# containerd's importer builds a docker schema2 manifest from this and needs `os` and
# `architecture` in the config to match the platform it unpacks for; `rootfs.diff_ids` must equal
# the sha256 of the uncompressed layer or unpacking fails.
set -euo pipefail

if [ "${MAKE_IMAGE_MERGE:-}" = 1 ]; then
  [ "$#" -ge 2 ] || { echo "make-image-tar: MAKE_IMAGE_MERGE=1 $0 OUT_TAR ARCHIVE..." >&2; exit 2; }
  out=$1; shift
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/out"
  for a in "$@"; do
    mkdir "$work/in"
    tar -C "$work/in" -xf "$a"
    jq -c '.[]' "$work/in/manifest.json" >> "$work/entries"
    rm "$work/in/manifest.json"
    cp -an "$work/in/." "$work/out/"
    rm -rf "$work/in"
  done
  jq -cs . "$work/entries" > "$work/out/manifest.json"
  mapfile -t top < <(cd "$work/out" && LC_ALL=C ls -A)
  tar --sort=name --mtime="@${SOURCE_DATE_EPOCH:-0}" --owner=0 --group=0 --numeric-owner --format=gnu \
    -C "$work/out" -cf "$work/image.tar" -- "${top[@]}"
  mv "$work/image.tar" "$out"
  exit 0
fi

if [ "$#" -lt 5 ] || [ "$#" -gt 6 ]; then
  sed -n '5,11p' "$0" >&2
  exit 2
fi
rootfs=$1 ref=$2 out=$3 entrypoint=$4 cmd=$5 user=${6:-}
epoch=${SOURCE_DATE_EPOCH:-0}

[ -d "$rootfs" ] || { echo "make-image-tar: rootfs directory $rootfs does not exist" >&2; exit 1; }
case "$ref" in
  *:*) ;;
  *) echo "make-image-tar: image reference $ref needs an explicit tag" >&2; exit 1 ;;
esac
for j in "$entrypoint" "$cmd"; do
  jq -e 'type == "array" or type == "null"' <<<"$j" >/dev/null \
    || { echo "make-image-tar: $j is not a JSON array or null" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar_flags=(--sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=gnu)

# Entries are named without a leading "./", as `docker save` writes them.
mapfile -t top < <(cd "$rootfs" && LC_ALL=C ls -A)
tar "${tar_flags[@]}" -C "$rootfs" -cf "$work/layer.tar" -- "${top[@]}"
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir "$work/out"
base_layers='[]' base_diffs='[]'
if [ -n "${MAKE_IMAGE_BASE:-}" ]; then
  mkdir "$work/base"
  tar -C "$work/base" -xf "$MAKE_IMAGE_BASE"
  base_layers=$(jq -c '.[0].Layers' "$work/base/manifest.json")
  base_diffs=$(jq -c '.rootfs.diff_ids' "$work/base/$(jq -r '.[0].Config' "$work/base/manifest.json")")
  for l in $(jq -r '.[]' <<< "$base_layers"); do
    mkdir -p "$work/out/$(dirname "$l")"
    mv "$work/base/$l" "$work/out/$l"
  done
fi
mkdir -p "$work/out/$diff_id"
mv "$work/layer.tar" "$work/out/$diff_id/layer.tar"

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
jq -cn --arg created "$created" --arg diff "sha256:$diff_id" --arg user "$user" \
  --argjson base "$base_diffs" --argjson entrypoint "$entrypoint" --argjson cmd "$cmd" '{
    architecture: "amd64",
    os: "linux",
    created: $created,
    config: ({
      Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
      Entrypoint: $entrypoint,
      Cmd: $cmd,
      WorkingDir: "/"
    } + (if $user == "" then {} else {User: $user} end)),
    rootfs: {type: "layers", diff_ids: ($base + [$diff])},
    history: ([$base[] | {created: $created, created_by: "clusterctl tests/bed/make-image-tar.sh (base)"}]
      + [{created: $created, created_by: "clusterctl tests/bed/make-image-tar.sh"}])
  }' >"$work/config.json"
config_id=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/out/$config_id.json"

jq -cn --arg config "$config_id.json" --arg ref "$ref" --arg layer "$diff_id/layer.tar" \
  --argjson base "$base_layers" '[{Config: $config, RepoTags: [$ref], Layers: ($base + [$layer])}]' >"$work/out/manifest.json"

mapfile -t top < <(cd "$work/out" && LC_ALL=C ls -A)
tar "${tar_flags[@]}" -C "$work/out" -cf "$work/image.tar" -- "${top[@]}"
mv "$work/image.tar" "$out"
