"""Mesh packaging (examples/mesh): every manifest validates against a schema,
build-oci.sh writes a well-formed and reproducible OCI image layout whose layer
holds the built filter, the pinned manifest copies carry its digest, and
`countersign-approval check-config` accepts what ships and names the field of
what is broken."""
import copy
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stack import ENVOY, RELEASE, ROOT, TEMPLATE, WASM, filter_config_value, render

pytestmark = pytest.mark.timeout(180)

MESH = ROOT / "examples" / "mesh"
SCHEMAS = MESH / "schemas"
BUILD_OCI = MESH / "build-oci.sh"
CLI = RELEASE / "countersign-approval"
# Core kinds are checked against Kubernetes' own OpenAPI schemas (strict:
# unknown fields fail), as shipped by the kubernetes-validate package.
K8S_VERSION = "1.30.0"
# Custom resources are checked against the minimal schemas in examples/mesh/schemas.
CRD_GROUPS = {"extensions.istio.io", "networking.istio.io", "gateway.envoyproxy.io", "gateway.networking.k8s.io"}
PLACEHOLDER_SHA = "0" * 64
PLACEHOLDER_IMAGE = "registry.example.com/countersign/countersign-filter:0.1.0"


def manifest_files(base=MESH):
    return sorted(p for sub in ("istio", "envoy-gateway", "k8s", "k8s-postgres") for p in (base / sub).glob("*.yaml"))


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


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


def all_documents(base=MESH):
    return [(f, i, d) for f in manifest_files(base) for i, d in enumerate(documents(f))]


@pytest.mark.parametrize("path,index,doc", all_documents(),
                         ids=lambda v: str(v.relative_to(MESH)) if isinstance(v, Path) else None)
def test_manifest_validates(path, index, doc):
    assert validate(doc) == [], f"{path.relative_to(ROOT)} document {index + 1} ({doc.get('kind')})"


def test_every_kind_is_covered():
    kinds = {d["kind"] for _, _, d in all_documents()}
    assert {"WasmPlugin", "EnvoyFilter", "EnvoyExtensionPolicy", "EnvoyPatchPolicy", "Namespace", "Deployment",
            "Service", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget"} <= kinds


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
    ]
    for kind, mutate in cases:
        doc = copy.deepcopy(by_kind[kind])
        mutate(doc)
        assert validate(doc), f"a broken {kind} passed validation"


def deployment(variant):
    return next(d for f, _, d in all_documents() if d["kind"] == "Deployment" and f.parent.name == variant)


def service_config(variant):
    secret = next(d for f, _, d in all_documents() if d["kind"] == "Secret" and f.parent.name == variant)
    return tomllib.loads(secret["stringData"]["approval.toml"])


def test_deployment_is_single_replica_with_probes_and_resources():
    dep = deployment("k8s")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "countersign-data"
    assert volumes["config"]["secret"]["secretName"] == "countersign-approval"
    assert not service_config("k8s")["database"].startswith("postgres")


def test_postgres_deployment_runs_several_replicas_without_a_volume():
    dep = deployment("k8s-postgres")
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["config"], "replicas must not need a local volume"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service_config("k8s-postgres")["database"].startswith("postgresql://")
    pdb = next(d for _, _, d in all_documents() if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["minAvailable"] >= 1


# ----- the OCI image layout -------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_oci(out: Path, image="reg.test/cs/countersign-filter:9.9.9"):
    r = subprocess.run([str(BUILD_OCI), "--wasm", str(WASM), "--out", str(out), "--tag", "9.9.9", "--image", image],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in (out / "digests.env").read_text().split())


def blob(layout: Path, descriptor: dict) -> bytes:
    algo, _, hexdigest = descriptor["digest"].partition(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert sha256(data) == hexdigest, "blob content does not match its name"
    assert len(data) == descriptor["size"], "descriptor size does not match the blob"
    return data


def test_oci_layout_is_well_formed(tmp_path):
    wasm = WASM.read_bytes()
    digests = build_oci(tmp_path)
    layout = tmp_path / "oci"
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
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config = json.loads(blob(layout, manifest["config"]))
    [layer_desc] = manifest["layers"]
    assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer = blob(layout, layer_desc)

    # What Istio's and Envoy Gateway's fetchers do with a "compat" image: take
    # the last layer, gunzip, untar, read the entry whose base name is plugin.wasm.
    layer_tar = gzip.decompress(layer)
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        assert members[0].isfile() and members[0].mode == 0o644 and members[0].uid == 0
        extracted = tar.extractfile(members[0]).read()
    assert extracted == wasm and extracted[:4] == b"\0asm"
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + sha256(layer_tar)]}
    assert config["architecture"] and config["os"]

    # Nothing else in the layout; the digests file matches.
    assert sorted(p.name for p in (layout / "blobs" / "sha256").iterdir()) == sorted(
        [sha256(manifest_bytes), manifest["config"]["digest"][7:], layer_desc["digest"][7:]])
    assert digests["WASM_SHA256"] == sha256(wasm)
    assert digests["IMAGE_SHA256"] == sha256(manifest_bytes) == desc["digest"][7:]
    assert digests["IMAGE_DIGEST"] == desc["digest"]
    assert manifest["annotations"]["dev.countersign.wasm.sha256"] == sha256(wasm)


def test_oci_build_is_reproducible(tmp_path):
    build_oci(tmp_path / "a")
    build_oci(tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_pinned_manifests_carry_the_image_digest(tmp_path):
    digests = build_oci(tmp_path)
    pin = digests["IMAGE_SHA256"]
    committed = {p.relative_to(MESH) for p in manifest_files()
                 if not (p.is_relative_to(MESH / "k8s") or p.is_relative_to(MESH / "k8s-postgres"))}
    written = {p.relative_to(tmp_path) for p in manifest_files(tmp_path)}
    assert written == committed
    plugin = documents(tmp_path / "istio" / "wasmplugin.yaml")[0]
    assert plugin["spec"]["sha256"] == pin
    assert plugin["spec"]["url"] == "oci://reg.test/cs/countersign-filter:9.9.9"
    policy = next(d for d in documents(tmp_path / "envoy-gateway" / "extension-policy.yaml")
                  if d["kind"] == "EnvoyExtensionPolicy")
    image = policy["spec"]["wasm"][0]["code"]["image"]
    assert image == {"url": "reg.test/cs/countersign-filter:9.9.9", "sha256": pin}
    # The committed files keep the placeholders; the copies have none left.
    assert PLACEHOLDER_SHA in (MESH / "istio" / "wasmplugin.yaml").read_text()
    for path in manifest_files(tmp_path):
        text = path.read_text()
        assert PLACEHOLDER_SHA not in text and PLACEHOLDER_IMAGE not in text, path
        for i, doc in enumerate(documents(path)):
            assert validate(doc) == [], f"{path} document {i + 1}"


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


def test_check_config_accepts_the_mesh_examples(tmp_path):
    args = [a for f in manifest_files() for a in ("--envoy", f)]
    r = check_config(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "approval_token matches filter_token_sha256" in r.stdout
    assert "an EnvoyFilter inserts envoy.filters.http.buffer after `istio-system.countersign`" in r.stdout
    # Only the placeholder pins are left to fix, and the pinned copies fix them.
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and all("placeholder" in w for w in warnings), warnings
    build_oci(tmp_path)
    pinned = [p for p in manifest_files(tmp_path)] + sorted((MESH / "k8s").glob("*.yaml")) \
        + sorted((MESH / "k8s-postgres").glob("*.yaml"))
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
    service = MESH / "k8s" / "10-secret.yaml"
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
