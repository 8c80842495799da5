"""Reproducible OCI image layouts for build-oci.sh: the one place that writes
layers, configs, manifests and layouts, for both images it builds.

- the filter: the "compat" Wasm image variant, one layer holding plugin.wasm;
- the approval service: one layer holding the release binary, exactly the
  shared libraries `ldd` lists for it (the dynamic loader included), the CA
  certificates and a minimal /etc (a non-root user 10001), and a config with
  Entrypoint, Cmd, User and ExposedPorts.

Reproducible: entries sorted, mtimes SOURCE_DATE_EPOCH, owners numeric with no
names, gzip without file name or timestamp, JSON in a fixed key order. The
same inputs give the same bytes, hence the same digests.

Run by build-oci.sh (`python3 oci.py --help` lists the arguments)."""
import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass

PLACEHOLDER_SHA = "0" * 64
PLACEHOLDER_FILTER_IMAGE = "registry.example.com/countersign/countersign-filter:0.1.0"
# The name the kustomize base gives the approval service's image (its `images:`).
BASE_APPROVAL_IMAGE = "registry.example.com/countersign/countersign-approval"

# The approval service's image.
APPROVAL_BIN = "usr/local/bin/countersign-approval"
APPROVAL_UID = 10001
APPROVAL_PORT = 8081
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
# ELF e_machine -> OCI architecture.
ELF_ARCH = {0x3E: "amd64", 0xB7: "arm64", 0xF3: "riscv64", 0x16: "s390x", 0x15: "ppc64le"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Entry:
    """One file or directory of a layer; `data` None for a directory."""
    path: str
    data: bytes | None
    mode: int
    uid: int = 0


def layer(entries: list[Entry], epoch: int) -> tuple[bytes, bytes]:
    """A tar of the entries (every parent directory added, 0755 root), sorted
    by path, and its gzip; returns (tar, tar.gz)."""
    by_path = {e.path: e for e in entries}
    for e in entries:
        parts = e.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            by_path.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i]), None, 0o755))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(by_path):
            e = by_path[path]
            info = tarfile.TarInfo(path)
            info.mtime, info.mode = epoch, e.mode
            info.uid = info.gid = e.uid
            info.uname = info.gname = ""
            if e.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    layer_tar = buf.getvalue()
    gz_buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buf, mtime=0, compresslevel=9) as gz:
        gz.write(layer_tar)
    return layer_tar, gz_buf.getvalue()


def write_layout(layout: str, tag: str, config: dict, layer_tar: bytes, layer_gz: bytes,
                 annotations: dict) -> str:
    """Writes an OCI image layout holding one image of one layer, tagged
    `tag`; returns the image (manifest) digest's hex."""
    config = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + sha(layer_tar)]})
    config_bytes = canonical(config)
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + sha(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + sha(layer_gz), "size": len(layer_gz)}],
        "annotations": annotations,
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": "sha256:" + sha(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    })
    shutil.rmtree(layout, ignore_errors=True)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    for blob in (layer_gz, config_bytes, manifest):
        with open(os.path.join(blobs, sha(blob)), "wb") as f:
            f.write(blob)
    with open(os.path.join(layout, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(index)
    return sha(manifest)


def filter_image(wasm_path: str, layout: str, tag: str, epoch: int) -> tuple[str, bytes]:
    """The filter's "compat" Wasm image; returns (image digest hex, the wasm)."""
    wasm = open(wasm_path, "rb").read()
    if wasm[:4] != b"\0asm":
        sys.exit(f"build-oci.sh: {wasm_path} is not a WebAssembly module")
    layer_tar, layer_gz = layer([Entry("plugin.wasm", wasm, 0o644)], epoch)
    created = rfc3339(epoch)
    config = {
        "created": created,
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "history": [{"created": created, "created_by": "examples/mesh/build-oci.sh"}],
    }
    digest = write_layout(layout, tag, config, layer_tar, layer_gz, {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.title": "countersign-filter",
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.description": "countersign: human approval for LLM inference (proxy-wasm filter)",
        "dev.countersign.wasm.sha256": sha(wasm),
    })
    return digest, wasm


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths of the shared objects `ldd` resolves for `binary`
    (its dynamic loader among them), in ldd's order; none for a static one."""
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if r.returncode != 0:
        if "not a dynamic executable" in r.stdout + r.stderr:
            return []
        sys.exit(f"build-oci.sh: ldd {binary} failed: {r.stderr.strip()}")
    paths = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            sys.exit(f"build-oci.sh: {binary} needs a library that is not installed: {line}")
        m = re.match(r"^(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            paths.append(os.path.normpath(m.group(1)))
        elif "=>" in line or line.startswith("/"):
            sys.exit(f"build-oci.sh: cannot read this line of `ldd {binary}`: {line}")
    return paths


def elf_architecture(binary: bytes, path: str) -> str:
    if binary[:4] != b"\x7fELF" or len(binary) < 20:
        sys.exit(f"build-oci.sh: {path} is not an ELF executable")
    machine = int.from_bytes(binary[18:20], "little" if binary[5] == 1 else "big")
    if machine not in ELF_ARCH:
        sys.exit(f"build-oci.sh: {path}: unknown ELF machine {machine:#x}")
    return ELF_ARCH[machine]


def approval_image(binary_path: str, layout: str, tag: str, epoch: int) -> str:
    """The approval service's image; returns its digest's hex."""
    binary = open(binary_path, "rb").read()
    arch = elf_architecture(binary, binary_path)
    user = f"{APPROVAL_UID}:{APPROVAL_UID}"
    entries = [
        Entry(APPROVAL_BIN, binary, 0o755),
        Entry("etc/passwd", (f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                             f"countersign:x:{APPROVAL_UID}:{APPROVAL_UID}:countersign:/var/lib/countersign:"
                             f"/usr/sbin/nologin\n").encode(), 0o644),
        Entry("etc/group", f"root:x:0:\ncountersign:x:{APPROVAL_UID}:\n".encode(), 0o644),
        Entry("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n", 0o644),
        # The configuration (a Secret) and the SQLite volume are mounted here.
        Entry("etc/countersign", None, 0o750, APPROVAL_UID),
        Entry("var/lib/countersign", None, 0o750, APPROVAL_UID),
        Entry("tmp", None, 0o1777),
    ]
    for lib in shared_libraries(binary_path):
        # Stored under the name the binary asks for (the loader's is its
        # PT_INTERP, /lib64/...), with the content of the file it resolves to.
        entries.append(Entry(lib.lstrip("/"), open(lib, "rb").read(), 0o755))
    env = ["PATH=/usr/local/bin:/usr/bin:/bin"]
    if os.path.isfile("/" + CA_BUNDLE):
        entries.append(Entry(CA_BUNDLE, open("/" + CA_BUNDLE, "rb").read(), 0o644))
        env.append(f"SSL_CERT_FILE=/{CA_BUNDLE}")
    else:
        print(f"note: /{CA_BUNDLE} not found; the image has no CA bundle (the service's own TLS "
              "uses the roots compiled into it)", file=sys.stderr)
    layer_tar, layer_gz = layer(entries, epoch)
    created = rfc3339(epoch)
    labels = {
        "org.opencontainers.image.title": "countersign-approval",
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.description": "countersign: human approval for LLM inference (approval service)",
    }
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": user,
            "ExposedPorts": {f"{APPROVAL_PORT}/tcp": {}},
            "Env": env,
            "Entrypoint": ["/" + APPROVAL_BIN],
            "Cmd": ["serve", "--config", "/etc/countersign/approval.toml"],
            "WorkingDir": "/var/lib/countersign",
            "Labels": labels,
        },
        "history": [{"created": created, "created_by": "examples/mesh/build-oci.sh"}],
    }
    return write_layout(layout, tag, config, layer_tar, layer_gz, labels)


def pinned_overlays(here: str, out: str, image: str, digest: str) -> list[str]:
    """out/kustomize/NAME: an overlay of each committed overlay that pins the
    approval service's image by digest (kustomize `images:`)."""
    name = image.rsplit("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    src_root = os.path.join(here, "kustomize", "overlays")
    dst_root = os.path.join(out, "kustomize")
    shutil.rmtree(dst_root, ignore_errors=True)
    written = []
    for overlay in sorted(os.listdir(src_root)):
        dst = os.path.join(dst_root, overlay)
        os.makedirs(dst)
        rel = os.path.relpath(os.path.join(src_root, overlay), dst)
        with open(os.path.join(dst, "kustomization.yaml"), "w") as f:
            f.write(f"# Written by examples/mesh/build-oci.sh: the overlay {overlay} with the approval\n"
                    f"# service's image pinned by digest. kubectl apply -k this directory.\n"
                    "apiVersion: kustomize.config.k8s.io/v1beta1\n"
                    "kind: Kustomization\n"
                    "resources:\n"
                    f"- {rel}\n"
                    "images:\n"
                    f"- name: {BASE_APPROVAL_IMAGE}\n"
                    f"  newName: {name}\n"
                    f"  digest: sha256:{digest}\n")
        written.append(os.path.join("kustomize", overlay, "kustomization.yaml"))
    return written


def pinned_mesh_manifests(here: str, out: str, image: str, digest: str) -> list[str]:
    """Copies of the Istio and Envoy Gateway manifests with the filter's image
    reference and its `sha256:` pin filled in."""
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
            text = text.replace(PLACEHOLDER_SHA, digest).replace(PLACEHOLDER_FILTER_IMAGE, image)
            with open(os.path.join(dst_dir, name), "w") as f:
                f.write(text)
            written.append(os.path.join(sub, name))
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--here", required=True, help="examples/mesh")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--wasm", required=True)
    p.add_argument("--image", required=True, help="the filter's reference")
    p.add_argument("--approval", required=True, help="the approval service's release binary")
    p.add_argument("--approval-image", required=True, help="the approval service's reference")
    a = p.parse_args()
    out = a.out

    filter_sha, wasm = filter_image(a.wasm, os.path.join(out, "oci"), a.tag, a.epoch)
    approval_sha = approval_image(a.approval, os.path.join(out, "oci-approval"), a.tag, a.epoch)
    with open(os.path.join(out, "digests.env"), "w") as f:
        f.write(f"WASM_SHA256={sha(wasm)}\n")
        f.write(f"IMAGE_DIGEST=sha256:{filter_sha}\n")
        f.write(f"IMAGE_SHA256={filter_sha}\n")
        f.write(f"IMAGE_REF={a.image}\n")
        f.write(f"APPROVAL_IMAGE_DIGEST=sha256:{approval_sha}\n")
        f.write(f"APPROVAL_IMAGE_REF={a.approval_image}\n")
    written = pinned_mesh_manifests(a.here, out, a.image, filter_sha)
    written += pinned_overlays(a.here, out, a.approval_image, approval_sha)

    print(f"wasm            {a.wasm}")
    print(f"  sha256        {sha(wasm)}  ({len(wasm)} bytes)")
    print(f"filter image    {os.path.join(out, 'oci')}  (OCI layout, tag {a.tag})")
    print(f"  digest        sha256:{filter_sha}  <- the `sha256:` pin (Istio, Envoy Gateway)")
    print(f"  reference     {a.image}")
    print(f"approval image  {os.path.join(out, 'oci-approval')}  (OCI layout, tag {a.tag}, from {a.approval})")
    print(f"  digest        sha256:{approval_sha}  <- pinned in out/kustomize/*")
    print(f"  reference     {a.approval_image}")
    print(f"pinned copies   {', '.join(written)} in {out}")
    print(f"digests         {os.path.join(out, 'digests.env')}")


if __name__ == "__main__":
    main()
