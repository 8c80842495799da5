#!/usr/bin/env bash
# Packages countersign as two OCI image layouts, without a container engine:
# the Wasm filter (which Istio's WasmPlugin and Envoy Gateway's
# EnvoyExtensionPolicy pull) and the approval service (which the Kubernetes
# Deployment runs); writes copies of the example manifests with both images
# pinned by digest.
#
#   examples/mesh/build-oci.sh [--wasm FILE] [--approval FILE] [--out DIR] [--tag TAG]
#                              [--image REF] [--approval-image REF]
#
#   --wasm FILE           the filter (default: target/wasm32-wasip1/wasm/countersign_filter.wasm,
#                         built with `cargo wasm` when missing)
#   --approval FILE       the approval service (default: target/release/countersign-approval,
#                         built with `cargo build --release` when missing)
#   --out DIR             where to write (default: examples/mesh/out)
#   --tag TAG             the tag recorded in the layouts (default: the workspace version)
#   --image REF           registry/repository:tag you will push the filter to; written into
#                         the manifest copies (default: registry.example.com/countersign/countersign-filter:TAG)
#   --approval-image REF  the same for the approval service
#                         (default: registry.example.com/countersign/countersign-approval:TAG)
#
# Output:
#   DIR/oci/                     the filter's OCI image layout (oci-layout, index.json, blobs/sha256/...)
#   DIR/oci-approval/            the approval service's OCI image layout
#   DIR/digests.env              WASM_SHA256, IMAGE_DIGEST, IMAGE_SHA256, IMAGE_REF,
#                                APPROVAL_IMAGE_DIGEST, APPROVAL_IMAGE_REF
#   DIR/istio/, DIR/envoy-gateway/   the manifests with `sha256:` pinned to IMAGE_SHA256
#   DIR/kustomize/sqlite/, DIR/kustomize/postgres/   overlays of kustomize/overlays/*
#                                that pin the approval service's image by digest (`images:`)
#
# The filter image is the "compat" Wasm image variant: one layer, a gzipped tar
# holding plugin.wasm (application/vnd.oci.image.layer.v1.tar+gzip), an OCI image
# config, and the annotation module.wasm.image/variant=compat. Istio and Envoy
# Gateway verify `sha256` against the image (manifest) digest, not the .wasm's hash.
#
# The approval service image is one layer: the binary, exactly the shared
# libraries `ldd` lists for it (glibc; SQLite and TLS are compiled in), the CA
# certificates and a minimal /etc with the non-root user 10001; its config
# runs `countersign-approval serve --config /etc/countersign/approval.toml` as
# 10001:10001 and exposes 8081/tcp. (examples/mesh/Containerfile builds an
# equivalent image with docker or podman.)
#
# Both builds are reproducible (oci.py writes them): fixed mtimes
# (SOURCE_DATE_EPOCH, default 0), owners numeric without names, sorted
# entries, no gzip name or timestamp, fixed JSON key order. Pushing is your
# step, keeping the digest, e.g.:
#   skopeo copy --preserve-digests oci:DIR/oci:TAG docker://REGISTRY/countersign-filter:TAG
#   skopeo copy --preserve-digests oci:DIR/oci-approval:TAG docker://REGISTRY/countersign-approval:TAG
#   oras cp --from-oci-layout DIR/oci:TAG REGISTRY/countersign-filter:TAG
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WASM="$ROOT/target/wasm32-wasip1/wasm/countersign_filter.wasm"
APPROVAL="$ROOT/target/release/countersign-approval"
OUT="$HERE/out"
TAG=""
IMAGE=""
APPROVAL_IMAGE=""
WASM_GIVEN=0
APPROVAL_GIVEN=0

while (($#)); do
    case "$1" in
        --wasm) WASM=$2; WASM_GIVEN=1; shift 2 ;;
        --approval) APPROVAL=$2; APPROVAL_GIVEN=1; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        --approval-image) APPROVAL_IMAGE=$2; shift 2 ;;
        -h|--help) sed -n '2,50p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-oci.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$TAG" ]; then
    TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)
    TAG=${TAG:-latest}
fi
IMAGE=${IMAGE:-registry.example.com/countersign/countersign-filter:$TAG}
IMAGE=${IMAGE#oci://}
APPROVAL_IMAGE=${APPROVAL_IMAGE:-registry.example.com/countersign/countersign-approval:$TAG}

if [ ! -f "$WASM" ]; then
    if [ "$WASM_GIVEN" = 1 ]; then
        echo "build-oci.sh: $WASM does not exist" >&2
        exit 1
    fi
    echo "==> building the filter (cargo wasm)" >&2
    (cd "$ROOT" && cargo build -q --locked -p countersign-filter --target wasm32-wasip1 --profile wasm)
fi
if [ ! -f "$APPROVAL" ]; then
    if [ "$APPROVAL_GIVEN" = 1 ]; then
        echo "build-oci.sh: $APPROVAL does not exist" >&2
        exit 1
    fi
    echo "==> building the approval service (cargo build --release)" >&2
    (cd "$ROOT" && cargo build -q --locked --release -p countersign-approval)
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

exec python3 "$HERE/oci.py" --here "$HERE" --out "$OUT" --tag "$TAG" --epoch "${SOURCE_DATE_EPOCH:-0}" \
    --wasm "$WASM" --image "$IMAGE" --approval "$APPROVAL" --approval-image "$APPROVAL_IMAGE"
