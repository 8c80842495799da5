"""Mesh packaging (examples/mesh): every manifest (the Istio and Envoy Gateway
files as committed, the Kustomize overlays as `kubectl kustomize` renders them)
validates against a schema; build-oci.sh writes well-formed and reproducible
OCI image layouts, the filter's holding the built filter and the approval
service's a root file system that runs the service; the pinned manifest copies
and overlays carry their digests; and `countersign-approval check-config`
accepts what ships and names the field of what is broken."""
import copy
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from stack import BINARIES, ENVOY, ROOT, TEMPLATE, WASM, Proc, filter_config_value, free_port, render, wait_started

pytestmark = pytest.mark.timeout(180)

MESH = ROOT / "examples" / "mesh"
SCHEMAS = MESH / "schemas"
BUILD_OCI = MESH / "build-oci.sh"
KUSTOMIZE = MESH / "kustomize"
OVERLAYS = sorted(p for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
# A real kustomize: kubectl's (`kubectl kustomize`), from the venv ./dev sets up.
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
CLI = BINARIES / "countersign-approval"
# Core kinds are checked against Kubernetes' own OpenAPI schemas (strict:
# unknown fields fail), as shipped by the kubernetes-validate package.
K8S_VERSION = "1.30.0"
# Custom resources are checked against the minimal schemas in examples/mesh/schemas.
CRD_GROUPS = {"extensions.istio.io", "networking.istio.io", "security.istio.io", "gateway.envoyproxy.io",
              "gateway.networking.k8s.io"}
PLACEHOLDER_SHA = "0" * 64
PLACEHOLDER_IMAGE = "registry.example.com/countersign/countersign-filter:0.1.0"
APPROVAL_IMAGE = "registry.example.com/countersign/countersign-approval"


def manifest_files(base=MESH):
    """The plain manifests (Istio, Envoy Gateway), committed or pinned copies."""
    return sorted(p for sub in ("istio", "envoy-gateway") for p in (base / sub).glob("*.yaml"))


def kustomize(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)


@functools.cache
def rendered(directory: Path) -> str:
    r = kustomize(directory)
    assert r.returncode == 0, f"kubectl kustomize {directory}: {r.stderr}"
    return r.stdout


def sources():
    """Every manifest as deployed: the plain files and the rendered overlays."""
    return manifest_files() + OVERLAYS


def documents(source: Path):
    text = rendered(source) if source.is_dir() else source.read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def write_rendered(directory: Path, tmp_path: Path) -> Path:
    """The overlay's rendering as a file (for check-config)."""
    out = tmp_path / f"{directory.name}-rendered.yaml"
    out.write_text(rendered(directory))
    return out


def validate(doc):
    """Validates one manifest; returns a list of problems (empty when valid)."""
    group_version = doc["apiVersion"]
    group, _, version = group_version.rpartition("/")
    if group not in CRD_GROUPS:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [str(e.message)]
        return []
    schema_path = SCHEMAS / group / f"{doc['kind'].lower()}_{version}.json"
    if not schema_path.exists():
        return [f"no schema {schema_path.relative_to(ROOT)} for {doc['kind']} {group_version}"]
    validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def all_documents():
    return [(f, i, d) for f in sources() for i, d in enumerate(documents(f))]


@pytest.mark.parametrize("path,index,doc", all_documents(),
                         ids=lambda v: str(v.relative_to(MESH)) if isinstance(v, Path) else None)
def test_manifest_validates(path, index, doc):
    assert validate(doc) == [], f"{path.relative_to(ROOT)} document {index + 1} ({doc.get('kind')})"


def test_every_kind_is_covered():
    kinds = {d["kind"] for _, _, d in all_documents()}
    assert {"WasmPlugin", "EnvoyFilter", "EnvoyExtensionPolicy", "EnvoyPatchPolicy", "Namespace", "Deployment",
            "Service", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget", "AuthorizationPolicy",
            "PeerAuthentication"} <= kinds


def test_validators_catch_mistakes():
    """The schemas are strict enough to catch the usual slips."""
    by_kind = {d["kind"]: d for _, _, d in all_documents()}
    cases = [
        ("WasmPlugin", lambda d: d["spec"].__setitem__("sha265", "x")),
        ("WasmPlugin", lambda d: d["spec"].__setitem__("failStrategy", "FAIL_CLOSED")),
        ("WasmPlugin", lambda d: d["spec"].__setitem__("sha256", "ABC")),
        ("EnvoyFilter", lambda d: d["spec"]["configPatches"][0]["patch"].__setitem__("operation", "INSERT_AFTERR")),
        ("EnvoyExtensionPolicy", lambda d: d["spec"]["wasm"][0]["code"].__setitem__("type", "OCI")),
        ("EnvoyExtensionPolicy", lambda d: d["spec"]["wasm"][0]["code"].pop("image")),
        ("EnvoyPatchPolicy", lambda d: d["spec"].pop("targetRef")),
        ("VirtualService", lambda d: d["spec"]["http"][0].__setitem__("timeout", "0s")),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["timeouts"].__setitem__("request", "forever")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("resource", {})),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
         .__setitem__("port", [1])),
        ("Service", lambda d: d["spec"]["ports"][0].__setitem__("prot", 1)),
        ("AuthorizationPolicy", lambda d: d["spec"].__setitem__("action", "PERMIT")),
        ("AuthorizationPolicy", lambda d: d["spec"]["rules"][0]["from"][0]["source"].__setitem__("principal", [])),
        ("PeerAuthentication", lambda d: d["spec"]["mtls"].__setitem__("mode", "STRICTLY")),
    ]
    for kind, mutate in cases:
        doc = copy.deepcopy(by_kind[kind])
        mutate(doc)
        assert validate(doc), f"a broken {kind} passed validation"


def test_only_the_gateway_may_call_the_filter_api_in_the_mesh():
    """istio/authorization.yaml: its selector picks the approval service's
    pods, its one principal is the identity Istio gives the gateway pods of
    gateway.yaml (their ServiceAccount), that principal alone reaches the
    filter API's paths, and every path the filter calls is one of them."""
    docs = [d for f in manifest_files() for d in documents(f)]
    [policy] = [d for d in docs if d["kind"] == "AuthorizationPolicy"]
    [gateway] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "llm-gateway"]
    [approval] = [d for d in documents(OVERLAYS[0]) if d["kind"] == "Deployment"]
    labels = approval["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["namespace"] == approval["metadata"]["namespace"]
    assert policy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    principal = f"cluster.local/ns/{gateway['metadata']['namespace']}/sa/{gateway['spec']['template']['spec']['serviceAccountName']}"
    filter_rule, others = policy["spec"]["rules"]
    assert [s["source"]["principals"] for s in filter_rule["from"]] == [[principal]]
    assert filter_rule["to"] == [{"operation": {"paths": ["/v1/*"]}}]
    assert others == {"to": [{"operation": {"notPaths": ["/v1/*"]}}]}
    # The service's filter API routes, as its router declares them, all under /v1/.
    routes = (ROOT / "approval-service" / "src" / "http" / "mod.rs").read_text()
    filter_routes = routes[routes.index("fn filter_routes"):]
    filter_routes = filter_routes[:filter_routes.index("\n}\n")]
    paths = re.findall(r'\.route\(\s*"([^"]+)"', filter_routes)
    assert paths and all(p.startswith("/v1/") for p in paths), paths


def overlay_doc(overlay, kind):
    [doc] = [d for d in documents(KUSTOMIZE / "overlays" / overlay) if d["kind"] == kind]
    return doc


def deployment(overlay):
    return overlay_doc(overlay, "Deployment")


def service_config_text(overlay):
    return overlay_doc(overlay, "Secret")["stringData"]["approval.toml"]


def service_config(overlay):
    return tomllib.loads(service_config_text(overlay))


def test_overlays_share_the_base():
    """Both overlays render the base's Namespace, Service and Deployment (its
    image from the base's `images:`), each with its own storage."""
    assert [p.name for p in OVERLAYS] == ["postgres", "sqlite"]
    kinds = {o.name: sorted(d["kind"] for d in documents(o)) for o in OVERLAYS}
    assert kinds == {
        "sqlite": ["Deployment", "Namespace", "PersistentVolumeClaim", "Secret", "Service"],
        "postgres": ["Deployment", "Namespace", "PodDisruptionBudget", "Secret", "Service"],
    }
    for overlay in OVERLAYS:
        docs = documents(overlay)
        assert all(d["metadata"].get("namespace", "countersign") == "countersign" for d in docs)
        [c] = deployment(overlay.name)["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"{APPROVAL_IMAGE}:0.1.0"
        assert c["args"] == ["serve", "--config", "/etc/countersign/approval.toml"]
        assert {"name": "config", "mountPath": "/etc/countersign", "readOnly": True} in c["volumeMounts"]
    service = overlay_doc("sqlite", "Service")
    assert service == overlay_doc("postgres", "Service")
    assert service["spec"]["selector"] == deployment("sqlite")["spec"]["selector"]["matchLabels"]


def test_deployment_is_single_replica_with_probes_and_resources():
    dep = deployment("sqlite")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "countersign-data"
    assert volumes["config"]["secret"]["secretName"] == "countersign-approval"
    assert {"name": "data", "mountPath": "/var/lib/countersign"} in c["volumeMounts"]
    assert dep["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    assert not service_config("sqlite")["database"].startswith("postgres")


def test_postgres_deployment_runs_several_replicas_without_a_volume():
    dep = deployment("postgres")
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["config"], "replicas must not need a local volume"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service_config("postgres")["database"].startswith("postgresql://")
    assert {"key": "db-ca.pem", "path": "db-ca.pem"} in pod["volumes"][0]["secret"]["items"]
    pdb = overlay_doc("postgres", "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["minAvailable"] >= 1


def test_a_broken_overlay_fails(tmp_path):
    """What checks the overlays catches a broken one: a patch that matches
    no resource or a missing file (kustomize refuses to render), a field the
    schema does not know (validation), a misspelt service setting
    (check-config)."""
    tree = tmp_path / "kustomize"
    shutil.copytree(KUSTOMIZE, tree)
    sqlite, postgres = tree / "overlays" / "sqlite", tree / "overlays" / "postgres"
    assert kustomize(sqlite).returncode == 0 and kustomize(postgres).returncode == 0

    patch = sqlite / "deployment-patch.yaml"
    good_patch = patch.read_text()
    patch.write_text(good_patch.replace("name: countersign-approval\n", "name: countersign-aproval\n", 1))
    r = kustomize(sqlite)
    assert r.returncode != 0 and "countersign-aproval" in r.stderr, r.stderr

    patch.write_text(good_patch.replace("    type: Recreate\n", "    type: Recreate\n  replica: 2\n"))
    docs = [d for d in yaml.safe_load_all(kustomize(sqlite).stdout) if d]
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    assert any("replica" in problem for problem in validate(dep)), validate(dep)
    patch.write_text(good_patch)

    kustomization = postgres / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("- pdb.yaml", "- pdb-missing.yaml"))
    r = kustomize(postgres)
    assert r.returncode != 0 and "pdb-missing.yaml" in r.stderr, r.stderr

    secret = sqlite / "secret.yaml"
    secret.write_text(secret.read_text().replace("max_long_poll_ms", "max_long_pol_ms"))
    out = tmp_path / "sqlite.yaml"
    out.write_text(kustomize(sqlite).stdout)
    r = check_config("--envoy", out)
    assert r.returncode == 1 and "max_long_pol_ms" in r.stderr, r.stdout + r.stderr


# ----- the OCI image layout -------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_oci(out: Path, image="reg.test/cs/countersign-filter:9.9.9",
              approval_image="reg.test/cs/countersign-approval:9.9.9"):
    r = subprocess.run([str(BUILD_OCI), "--wasm", str(WASM), "--approval", str(CLI), "--out", str(out),
                        "--tag", "9.9.9", "--image", image, "--approval-image", approval_image],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in (out / "digests.env").read_text().split())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build-oci.sh run (both images, the pinned copies) for the tests
    that read it; (out, digests.env)."""
    out = tmp_path_factory.mktemp("oci")
    return out, build_oci(out)


def blob(layout: Path, descriptor: dict) -> bytes:
    algo, _, hexdigest = descriptor["digest"].partition(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert sha256(data) == hexdigest, "blob content does not match its name"
    assert len(data) == descriptor["size"], "descriptor size does not match the blob"
    return data


def read_layout(layout: Path):
    """Checks an OCI layout holding one image tagged 9.9.9 with one gzip
    layer; returns (manifest bytes, manifest, config, layer tar)."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [desc] = index["manifests"]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "9.9.9"
    manifest_bytes = blob(layout, desc)
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config = json.loads(blob(layout, manifest["config"]))
    [layer_desc] = manifest["layers"]
    assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer_tar = gzip.decompress(blob(layout, layer_desc))
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + sha256(layer_tar)]}
    assert config["architecture"] and config["os"]
    # Nothing else in the layout.
    assert sorted(p.name for p in (layout / "blobs" / "sha256").iterdir()) == sorted(
        [desc["digest"][7:], manifest["config"]["digest"][7:], layer_desc["digest"][7:]])
    return manifest_bytes, manifest, config, layer_tar


def test_oci_layout_is_well_formed(built):
    out, digests = built
    wasm = WASM.read_bytes()
    manifest_bytes, manifest, _, layer_tar = read_layout(out / "oci")
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"

    # What Istio's and Envoy Gateway's fetchers do with a "compat" image: take
    # the last layer, gunzip, untar, read the entry whose base name is plugin.wasm.
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        assert members[0].isfile() and members[0].mode == 0o644 and members[0].uid == 0
        extracted = tar.extractfile(members[0]).read()
    assert extracted == wasm and extracted[:4] == b"\0asm"

    # The digests file matches.
    assert digests["WASM_SHA256"] == sha256(wasm)
    assert digests["IMAGE_SHA256"] == sha256(manifest_bytes)
    assert digests["IMAGE_DIGEST"] == "sha256:" + sha256(manifest_bytes)
    assert manifest["annotations"]["dev.countersign.wasm.sha256"] == sha256(wasm)


def ldd(binary: Path) -> set[str]:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    return {os.path.normpath(w) for line in r.stdout.splitlines() for w in line.split() if w.startswith("/")}


def test_approval_image_runs_the_service(built, tmp_path):
    """The approval service's image: one layer with the binary, exactly the
    libraries ldd lists, and a non-root user; umoci unpacks it (checking
    every digest) into a bundle whose process is the service as that user,
    and the service runs from the unpacked root alone (chroot): --version,
    check-config on the SQLite overlay's TOML, then `serve` answering
    /readyz with its database in the image's data directory."""
    out, digests = built
    manifest_bytes, _, config, layer_tar = read_layout(out / "oci-approval")
    assert digests["APPROVAL_IMAGE_DIGEST"] == "sha256:" + sha256(manifest_bytes)
    assert config["os"] == "linux"
    assert config["architecture"] == {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    c = config["config"]
    assert c["User"] == "10001:10001" and c["ExposedPorts"] == {"8081/tcp": {}}
    assert c["Entrypoint"] == ["/usr/local/bin/countersign-approval"]
    assert c["Cmd"] == ["serve", "--config", "/etc/countersign/approval.toml"]

    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == sorted(members), "entries are sorted"
        assert all(m.mtime == 0 and m.uname == "" for m in members.values())
        binary = members["usr/local/bin/countersign-approval"]
        assert binary.mode == 0o755 and binary.uid == 0
        assert tar.extractfile(binary).read() == CLI.read_bytes()
        files = {"/" + name for name, m in members.items() if m.isfile()}
        assert ldd(CLI) <= files, "a library the binary needs is missing"
        assert {f for f in files if ".so" in f} == ldd(CLI), "libraries the binary does not need"
        assert "countersign:x:10001:10001:" in tar.extractfile(members["etc/passwd"]).read().decode()
        assert members["var/lib/countersign"].isdir() and members["var/lib/countersign"].uid == 10001
        assert "etc/ssl/certs/ca-certificates.crt" in members

    root = os.geteuid() == 0
    bundle = tmp_path / "bundle"
    r = subprocess.run(["umoci", "unpack", *([] if root else ["--rootless"]),
                        "--image", f"{out / 'oci-approval'}:9.9.9", str(bundle)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    process = json.loads((bundle / "config.json").read_text())["process"]
    assert process["user"]["uid"] == 10001 and process["user"]["gid"] == 10001
    assert process["args"] == ["/usr/local/bin/countersign-approval", "serve", "--config",
                               "/etc/countersign/approval.toml"]
    assert "HOME=/var/lib/countersign" in process["env"], "the user's home comes from the image's /etc/passwd"
    rootfs = bundle / "rootfs"

    # Run as the image's user where this test may (root); else as root of a
    # user namespace.
    chroot = ["chroot", "--userspec=10001:10001", str(rootfs)] if root else ["unshare", "-r", "chroot", str(rootfs)]
    r = subprocess.run([*chroot, "/usr/local/bin/countersign-approval", "--version"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("countersign-approval "), r.stdout + r.stderr

    port = free_port()
    toml = service_config_text("sqlite").replace('listen = "0.0.0.0:8081"', f'listen = "127.0.0.1:{port}"')
    assert f"127.0.0.1:{port}" in toml
    (rootfs / "etc" / "countersign" / "approval.toml").write_text(toml)
    r = subprocess.run([*chroot, "/usr/local/bin/countersign-approval", "check-config", "--service-config",
                        "/etc/countersign/approval.toml"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = Proc("approval in the image", [*chroot, *c["Entrypoint"], *c["Cmd"]], tmp_path / "approval.log").start()
    try:
        wait_started(proc, f"http://127.0.0.1:{port}/readyz", "the service run from the image", timeout=30)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.stop()
    assert (rootfs / "var" / "lib" / "countersign" / "countersign.db").is_file()


def test_skopeo_copies_both_images_keeping_their_digests(built, tmp_path):
    """The push step of the README (skopeo copy --preserve-digests), to
    another OCI layout instead of a registry: the digests pinned in the
    manifests are those of the copies."""
    out, digests = built
    for layout, digest in (("oci", digests["IMAGE_DIGEST"]), ("oci-approval", digests["APPROVAL_IMAGE_DIGEST"])):
        dest = tmp_path / layout
        r = subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", f"oci:{out / layout}:9.9.9",
                            f"oci:{dest}:9.9.9"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        [desc] = json.loads((dest / "index.json").read_text())["manifests"]
        assert desc["digest"] == digest, layout


def test_oci_build_is_reproducible(built, tmp_path):
    first, _ = built
    build_oci(tmp_path)
    files_a = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("oci-approval/index.json") in files_a and Path("kustomize/sqlite/kustomization.yaml") in files_a
    for rel in files_a:
        if rel.parts[0] == "kustomize":
            continue  # they name the overlays by a path relative to themselves
        assert (first / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_pinned_manifests_carry_the_image_digest(built):
    out, digests = built
    pin = digests["IMAGE_SHA256"]
    committed = {p.relative_to(MESH) for p in manifest_files()}
    written = {p.relative_to(out) for p in manifest_files(out)}
    assert written == committed
    plugin = documents(out / "istio" / "wasmplugin.yaml")[0]
    assert plugin["spec"]["sha256"] == pin
    assert plugin["spec"]["url"] == "oci://reg.test/cs/countersign-filter:9.9.9"
    policy = next(d for d in documents(out / "envoy-gateway" / "extension-policy.yaml")
                  if d["kind"] == "EnvoyExtensionPolicy")
    image = policy["spec"]["wasm"][0]["code"]["image"]
    assert image == {"url": "reg.test/cs/countersign-filter:9.9.9", "sha256": pin}
    # The committed files keep the placeholders; the copies have none left.
    assert PLACEHOLDER_SHA in (MESH / "istio" / "wasmplugin.yaml").read_text()
    for path in manifest_files(out):
        text = path.read_text()
        assert PLACEHOLDER_SHA not in text and PLACEHOLDER_IMAGE not in text, path
        for i, doc in enumerate(documents(path)):
            assert validate(doc) == [], f"{path} document {i + 1}"

    # The pinned overlays: each committed overlay, its image by digest.
    assert sorted(p.name for p in (out / "kustomize").iterdir()) == [o.name for o in OVERLAYS]
    for overlay in OVERLAYS:
        pinned = out / "kustomize" / overlay.name
        docs = documents(pinned)
        assert len(docs) == len(documents(overlay))
        [dep] = [d for d in docs if d["kind"] == "Deployment"]
        [c] = dep["spec"]["template"]["spec"]["containers"]
        assert c["image"] == "reg.test/cs/countersign-approval@" + digests["APPROVAL_IMAGE_DIGEST"]
        assert dep == json.loads(json.dumps(deployment(overlay.name)).replace(f"{APPROVAL_IMAGE}:0.1.0", c["image"]))
        for i, doc in enumerate(docs):
            assert validate(doc) == [], f"{pinned} document {i + 1}"


# ----- check-config ---------------------------------------------------------

def check_config(*args):
    return subprocess.run([str(CLI), "check-config", *map(str, args)], capture_output=True, text=True,
                          timeout=90, cwd=ROOT)


def rendered_template(tmp_path, filter_config):
    out = tmp_path / "envoy.yaml"
    out.write_text(render(TEMPLATE.read_text(), {
        "ADMIN_PORT": 19901, "LISTEN_PORT": 10000, "MODEL_PORT": 8000, "APPROVAL_PORT": 8081,
        "BUFFER_LIMIT": 16 * 1024 * 1024, "WASM_PATH": WASM, "FILTER_CONFIG": filter_config_value(filter_config),
    }))
    return out


def test_check_config_accepts_the_rendered_template(tmp_path):
    config = json.loads((ROOT / "envoy" / "filter-config.json").read_text())
    envoy_yaml = rendered_template(tmp_path, config)
    r = check_config("--envoy", envoy_yaml, "--plugin-config", ROOT / "envoy" / "filter-config.json",
                     "--envoy-bin", ENVOY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "envoy.filters.http.buffer follows countersign" in r.stdout
    assert "--mode validate` accepts it" in r.stdout
    assert "0 error(s), 0 warning(s)" in r.stdout


def test_check_config_names_the_broken_field(tmp_path):
    bad = {"rules": [{"action": "allow"}, {"action": "allow", "model": ""}]}
    plugin = tmp_path / "plugin.json"
    plugin.write_text(json.dumps(bad))
    r = check_config("--plugin-config", plugin)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: {plugin}: field `rules[1].model`" in r.stderr

    # The same configuration inside an Envoy YAML: the field and the filter are named.
    r = check_config("--envoy", rendered_template(tmp_path, bad), "--envoy-bin", ENVOY)
    assert r.returncode == 1
    assert "field `rules[1].model`" in r.stderr and "http filter `countersign`" in r.stderr

    # A misspelt field in a WasmPlugin's pluginConfig.
    plugin_doc = documents(MESH / "istio" / "wasmplugin.yaml")[0]
    plugin_doc["spec"]["pluginConfig"]["hold_timout_ms"] = 5
    manifest = tmp_path / "wasmplugin.yaml"
    manifest.write_text(yaml.safe_dump(plugin_doc))
    r = check_config("--envoy", manifest)
    assert r.returncode == 1 and "field `hold_timout_ms`" in r.stderr, r.stderr


def test_check_config_refuses_a_template_and_a_missing_buffer(tmp_path):
    r = check_config("--envoy", TEMPLATE, "--no-envoy")
    assert r.returncode == 1 and "unrendered template placeholder" in r.stderr, r.stderr
    text = rendered_template(tmp_path, {}).read_text()
    start = text.index("          - name: envoy.filters.http.buffer")
    end = text.index("          - name: envoy.filters.http.router")
    no_buffer = tmp_path / "no-buffer.yaml"
    no_buffer.write_text(text[:start] + text[end:])
    r = check_config("--envoy", no_buffer, "--envoy-bin", ENVOY)
    assert r.returncode == 1 and "not envoy.filters.http.buffer" in r.stderr, r.stderr


def test_check_config_warns_about_short_timeouts(tmp_path):
    envoy_yaml = rendered_template(tmp_path, {"hold_timeout_ms": 7_200_000})
    r = check_config("--envoy", envoy_yaml, "--envoy-bin", ENVOY)
    assert r.returncode == 0, r.stderr
    assert "stream_idle_timeout 3600s is not above the longest hold (7200s)" in r.stderr


def test_check_config_accepts_the_mesh_examples(built, tmp_path):
    """The committed manifests and the rendered overlays (the token hashes in
    their Secrets' TOML), then the pinned copies and pinned overlays."""
    overlays = [write_rendered(o, tmp_path) for o in OVERLAYS]
    args = [a for f in manifest_files() + overlays for a in ("--envoy", f)]
    r = check_config(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "approval_token matches filter_token_sha256" in r.stdout
    assert "an EnvoyFilter inserts envoy.filters.http.buffer after `istio-system.countersign`" in r.stdout
    # Only the placeholder pins are left to fix, and the pinned copies fix them.
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and all("placeholder" in w for w in warnings), warnings
    for f in overlays:
        assert f"ok: {f}: Secret countersign/countersign-approval, document 2, key approval.toml: " \
               "service configuration valid" in r.stdout, r.stdout
        assert f"approval_token matches filter_token_sha256 of {f}" in r.stdout, r.stdout
    out, _ = built
    pinned_dir = tmp_path / "pinned"
    pinned_dir.mkdir()
    pinned = manifest_files(out) + [write_rendered(out / "kustomize" / o.name, pinned_dir) for o in OVERLAYS]
    r = check_config(*[a for f in pinned for a in ("--envoy", f)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 error(s), 0 warning(s)" in r.stdout, r.stdout + r.stderr


def test_the_mesh_filter_token_comes_from_a_secret_through_the_gateways_environment(tmp_path):
    """The manifests never hold the filter token inline: the WasmPlugin and the
    EnvoyExtensionPolicy read it from the gateway's environment, which the
    gateway's Deployment / EnvoyProxy fill from a Secret; check-config follows
    that path to the Secret and compares the token with the service's hash,
    refuses an inline token and a variable the VM is not given, and catches a
    Secret whose token is not the service's."""
    service = KUSTOMIZE / "overlays" / "sqlite" / "secret.yaml"
    mesh = [(MESH / "istio" / "wasmplugin.yaml", MESH / "istio" / "gateway.yaml",
             lambda d: d["spec"]["pluginConfig"], lambda d: d["spec"].pop("vmConfig")),
            (MESH / "envoy-gateway" / "extension-policy.yaml", MESH / "envoy-gateway" / "envoy-proxy.yaml",
             lambda d: d["spec"]["wasm"][0]["config"], lambda d: d["spec"]["wasm"][0].pop("env"))]
    for plugin_file, env_file, config_of, drop_env in mesh:
        assert "approval_token:" not in plugin_file.read_text()
        r = check_config("--envoy", plugin_file, "--envoy", env_file, "--envoy", service)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "approval_token_env: the gateway takes `COUNTERSIGN_APPROVAL_TOKEN` from Secret " \
               "countersign-filter-token, key token" in r.stdout, r.stdout
        assert "approval_token matches filter_token_sha256" in r.stdout, r.stdout

        inline = documents(plugin_file)[0]
        config = config_of(inline)
        del config["approval_token_env"]
        config["approval_token"] = "change-me-filter-token"
        bad = tmp_path / plugin_file.name
        bad.write_text(yaml.safe_dump(inline))
        r = check_config("--envoy", bad)
        assert r.returncode == 1 and "field `approval_token`: the filter token is written in" in r.stderr, r.stderr

        undeclared = documents(plugin_file)[0]
        drop_env(undeclared)
        bad.write_text(yaml.safe_dump(undeclared))
        r = check_config("--envoy", bad)
        assert r.returncode == 1 and "approval_token_env" in r.stderr, r.stderr

        other = tmp_path / env_file.name
        other.write_text(env_file.read_text().replace("token: change-me-filter-token", "token: another-token"))
        r = check_config("--envoy", plugin_file, "--envoy", other, "--envoy", service)
        assert r.returncode == 1 and "its SHA-256 is not filter_token_sha256" in r.stderr, r.stderr


def test_check_config_usage_errors():
    assert check_config().returncode == 2
    assert check_config("--bogus").returncode == 2


@pytest.mark.parametrize("example", sorted(p.relative_to(ROOT) for p in (ROOT / "examples").glob("*/envoy.yaml")),
                         ids=str)
def test_check_config_accepts_the_envoy_examples(example):
    r = check_config("--envoy", example, "--envoy-bin", ENVOY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "envoy.filters.http.buffer follows countersign" in r.stdout
