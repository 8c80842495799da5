#!/usr/bin/env bash
# Packages the countersign Wasm filter as an OCI image layout that Istio's
# WasmPlugin and Envoy Gateway's EnvoyExtensionPolicy can pull, and writes
# copies of the example manifests with the image pinned by digest.
#
#   examples/mesh/build-oci.sh [--wasm FILE] [--out DIR] [--tag TAG] [--image REF]
#
#   --wasm FILE   the filter (default: target/wasm32-wasip1/wasm/countersign_filter.wasm,
#                 built with `cargo wasm` when missing)
#   --out DIR     where to write (default: examples/mesh/out)
#   --tag TAG     the tag recorded in the layout (default: the workspace version)
#   --image REF   registry/repository:tag you will push to; written into the
#                 manifest copies (default: registry.example.com/countersign/countersign-filter:TAG)
#
# Output:
#   DIR/oci/                     OCI image layout (oci-layout, index.json, blobs/sha256/...)
#   DIR/digests.env              WASM_SHA256, IMAGE_DIGEST, IMAGE_SHA256, IMAGE_REF
#   DIR/istio/, DIR/envoy-gateway/   the manifests with `sha256:` pinned to IMAGE_SHA256
#
# The image is the "compat" Wasm image variant: one layer, a gzipped tar holding
# plugin.wasm (application/vnd.oci.image.layer.v1.tar+gzip), an OCI image config,
# and the annotation module.wasm.image/variant=compat. Istio and Envoy Gateway
# verify `sha256` against the image (manifest) digest, not the .wasm's hash.
#
# The build is reproducible: fixed mtimes (SOURCE_DATE_EPOCH, default 0),
# owner 0:0, no gzip name or timestamp, fixed JSON key order. Pushing is your
# step, keeping the digest, e.g.:
#   skopeo copy --preserve-digests oci:DIR/oci:TAG docker://REGISTRY/countersign-filter:TAG
#   oras cp --from-oci-layout DIR/oci:TAG REGISTRY/countersign-filter:TAG
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WASM="$ROOT/target/wasm32-wasip1/wasm/countersign_filter.wasm"
OUT="$HERE/out"
TAG=""
IMAGE=""
WASM_GIVEN=0

while (($#)); do
    case "$1" in
        --wasm) WASM=$2; WASM_GIVEN=1; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-oci.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$TAG" ]; then
    TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)
    TAG=${TAG:-latest}
fi
IMAGE=${IMAGE:-registry.example.com/countersign/countersign-filter:$TAG}
IMAGE=${IMAGE#oci://}

if [ ! -f "$WASM" ]; then
    if [ "$WASM_GIVEN" = 1 ]; then
        echo "build-oci.sh: $WASM does not exist" >&2
        exit 1
    fi
    echo "==> building the filter (cargo wasm)" >&2
    (cd "$ROOT" && cargo build -q --locked -p countersign-filter --target wasm32-wasip1 --profile wasm)
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

python3 - "$WASM" "$OUT" "$TAG" "$IMAGE" "$HERE" "${SOURCE_DATE_EPOCH:-0}" <<'PY'
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

wasm_path, out, tag, image, here, epoch = sys.argv[1:7]
epoch = int(epoch)
PLACEHOLDER_SHA = "0" * 64
PLACEHOLDER_IMAGE = "registry.example.com/countersign/countersign-filter:0.1.0"

wasm = open(wasm_path, "rb").read()
if wasm[:4] != b"\0asm":
    sys.exit(f"build-oci.sh: {wasm_path} is not a WebAssembly module")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# The layer: a tar with plugin.wasm, then gzip without name or timestamp.
tar_buf = io.BytesIO()
with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    info = tarfile.TarInfo("plugin.wasm")
    info.size, info.mtime, info.mode = len(wasm), epoch, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(wasm))
layer_tar = tar_buf.getvalue()
gz_buf = io.BytesIO()
with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buf, mtime=0, compresslevel=9) as gz:
    gz.write(layer_tar)
layer = gz_buf.getvalue()

created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
config = canonical({
    "created": created,
    "architecture": "wasm",
    "os": "wasip1",
    "config": {},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(layer_tar)]},
    "history": [{"created": created, "created_by": "examples/mesh/build-oci.sh"}],
})
manifest = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": "sha256:" + sha(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + sha(layer), "size": len(layer)}],
    "annotations": {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.title": "countersign-filter",
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.description": "countersign: human approval for LLM inference (proxy-wasm filter)",
        "dev.countersign.wasm.sha256": sha(wasm),
    },
})
index = canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": "sha256:" + sha(manifest), "size": len(manifest),
                   "annotations": {"org.opencontainers.image.ref.name": tag}}],
})

layout = os.path.join(out, "oci")
shutil.rmtree(layout, ignore_errors=True)
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs)
for blob in (layer, config, manifest):
    with open(os.path.join(blobs, sha(blob)), "wb") as f:
        f.write(blob)
with open(os.path.join(layout, "oci-layout"), "wb") as f:
    f.write(canonical({"imageLayoutVersion": "1.0.0"}))
with open(os.path.join(layout, "index.json"), "wb") as f:
    f.write(index)

image_sha = sha(manifest)
with open(os.path.join(out, "digests.env"), "w") as f:
    f.write(f"WASM_SHA256={sha(wasm)}\n")
    f.write(f"IMAGE_DIGEST=sha256:{image_sha}\n")
    f.write(f"IMAGE_SHA256={image_sha}\n")
    f.write(f"IMAGE_REF={image}\n")

# Manifest copies with the pin and the image reference filled in.
written = []
for sub in ("istio", "envoy-gateway"):
    src_dir, dst_dir = os.path.join(here, sub), os.path.join(out, sub)
    if not os.path.isdir(src_dir):
        continue
    shutil.rmtree(dst_dir, ignore_errors=True)
    os.makedirs(dst_dir)
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".yaml"):
            continue
        text = open(os.path.join(src_dir, name)).read()
        text = text.replace(PLACEHOLDER_SHA, image_sha).replace(PLACEHOLDER_IMAGE, image)
        with open(os.path.join(dst_dir, name), "w") as f:
            f.write(text)
        written.append(os.path.join(sub, name))

print(f"wasm            {wasm_path}")
print(f"  sha256        {sha(wasm)}  ({len(wasm)} bytes)")
print(f"OCI layout      {layout}  (tag {tag})")
print(f"  image digest  sha256:{image_sha}  <- the `sha256:` pin (Istio, Envoy Gateway)")
print(f"  layer         sha256:{sha(layer)}  ({len(layer)} bytes, plugin.wasm)")
print(f"image reference {image}")
print(f"pinned copies   {', '.join(written) or '(none)'} in {out}")
print(f"digests         {os.path.join(out, 'digests.env')}")
PY
