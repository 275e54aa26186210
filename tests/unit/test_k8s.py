"""deploy/k8s/ manifests, checked offline.

No cluster or kubectl here, and kubeconform is not installable from PyPI, so this
checks what the manifests must get right for this project: structure per kind,
selectors, claims, config and secret references, and that every container
command is a valid ``pipeline`` call against the files the ConfigMap mounts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.model.spec import ModelSpec
from pipeline.ps.keys import ShardKeys
from pipeline.publish.publisher import lock_key as publisher_lock_key
from pipeline.snapshot.protocol import lock_key as snapshot_lock_key
from tests.deploycheck import ROOT, check_cli_call, option, shell_cli_call

pytestmark = pytest.mark.unit

K8S = ROOT / "deploy" / "k8s"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    out: list[Doc] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: empty or non-mapping document"
            doc["__file__"] = path.name
            out.append(doc)
    return out


def _named(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _containers(doc: Doc) -> list[Doc]:
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.fixture(scope="module")
def mounted_files(docs: list[Doc], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Container path -> local copy of every key of the pipeline-files ConfigMap."""
    folder = tmp_path_factory.mktemp("etc-pipeline")
    files = _named(docs, "ConfigMap")["pipeline-files"]["data"]
    out = {}
    for key, text in files.items():
        (folder / key).write_text(text)
        out[f"/etc/pipeline/{key}"] = folder / key
    return out


def test_every_document_has_kind_and_name(docs: list[Doc]) -> None:
    assert docs
    names = set()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        name = doc.get("metadata", {}).get("name")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), doc["__file__"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "pipeline", f"{name}: namespace"
        assert (doc["kind"], name) not in names, f"duplicate {doc['kind']} {name}"
        names.add((doc["kind"], name))


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "pipeline"


def test_workloads_are_well_formed(docs: list[Doc]) -> None:
    services = _named(docs, "Service")
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        if doc["kind"] != "Job":
            match = spec["selector"]["matchLabels"]
            assert match and match.items() <= labels.items(), f"{name}: selector vs labels"
        for container in _containers(doc):
            assert container.get("image"), f"{name}: no image"
            assert container.get("command"), f"{name}: no command"
        if doc["kind"] == "StatefulSet":
            service = services.get(spec["serviceName"])
            assert service is not None, f"{name}: serviceName {spec['serviceName']} missing"
            assert service["spec"].get("clusterIP") == "None", "StatefulSet needs a headless one"


def test_services_select_pods_and_ports(docs: list[Doc]) -> None:
    pods = [d for d in docs if d["kind"] in WORKLOADS]
    for name, service in _named(docs, "Service").items():
        selector = service["spec"]["selector"]
        targets = [d for d in pods if selector.items() <= d["spec"]["template"]["metadata"][
            "labels"].items()]  # fmt: skip
        assert targets, f"service {name} selects no pod template"
        ports = {
            p.get(k) for d in targets for c in _containers(d) for p in c.get("ports", [])
            for k in ("name", "containerPort")
        }  # fmt: skip
        for port in service["spec"].get("ports", []):
            assert port.get("targetPort", port["port"]) in ports, f"{name}: targetPort"


def test_volumes_and_claims_resolve(docs: list[Doc]) -> None:
    claims = _named(docs, "PersistentVolumeClaim")
    configmaps = _named(docs, "ConfigMap")
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        name, pod = doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        mounted = {m["name"] for c in _containers(doc) for m in c.get("volumeMounts", [])}
        assert mounted <= set(volumes) | templates, f"{name}: mounts without a volume"
        assert templates <= mounted, f"{name}: unused volumeClaimTemplates {templates - mounted}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, name


def test_config_and_secret_references_exist(docs: list[Doc]) -> None:
    sources = {"ConfigMap": _named(docs, "ConfigMap"), "Secret": _named(docs, "Secret")}

    def keys(kind: str, name: str) -> set[str]:
        assert name in sources[kind], f"{kind} {name} is not defined"
        doc = sources[kind][name]
        return set(doc.get("data") or {}) | set(doc.get("stringData") or {})

    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in _containers(doc):
            for ref in container.get("envFrom", []):
                if "configMapRef" in ref:
                    keys("ConfigMap", ref["configMapRef"]["name"])
                if "secretRef" in ref:
                    keys("Secret", ref["secretRef"]["name"])
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if field in source:
                        ref = source[field]
                        assert ref["key"] in keys(kind, ref["name"]), f"{kind} key {ref}"


def test_settings_are_known_env_vars(docs: list[Doc]) -> None:
    """Every PIPELINE_* key set in a ConfigMap or Secret is a setting the code reads."""
    reference = CliRunner().invoke(cli, ["config", "docs"])
    assert reference.exit_code == 0, reference.output
    known = set(re.findall(r"`(PIPELINE_\w+)`", reference.output)) | {"PIPELINE_LOG_LEVEL"}
    for kind in ("ConfigMap", "Secret"):
        for name, doc in _named(docs, kind).items():
            for key in {**(doc.get("data") or {}), **(doc.get("stringData") or {})}:
                if key.startswith("PIPELINE_"):
                    assert key in known, f"{kind} {name}: unknown setting {key}"


def test_mounted_files_match_the_repository(mounted_files: dict[str, Path]) -> None:
    copies = {"tables.yaml": ROOT / "deploy/tables.yaml"}
    copies |= {p.name: p for p in (ROOT / "deploy/models").glob("*.yaml")}
    for container_path, local in mounted_files.items():
        source = copies.get(local.name)
        assert source is not None, f"{container_path}: no repository file of that name"
        assert yaml.safe_load(local.read_text()) == yaml.safe_load(source.read_text()), (
            f"{container_path} drifted from {source.relative_to(ROOT)}"
        )


def _argv(doc: Doc, container: Doc, env: dict[str, str]) -> list[str]:
    command = [str(c) for c in container["command"]]
    if command[0] == "pipeline":
        return command[1:]
    assert command[:2] in (["/bin/sh", "-c"], ["sh", "-c"]) and len(command) == 3, command
    return shell_cli_call(command[2], env)


def test_every_command_is_a_valid_pipeline_call(
    docs: list[Doc], mounted_files: dict[str, Path]
) -> None:
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        name = doc["metadata"]["name"]
        for container in _containers(doc):
            argv = _argv(doc, container, {"HOSTNAME": f"{name}-0"})
            check_cli_call(argv, name, files=mounted_files)


def _workloads_running(docs: list[Doc], *prefix: str) -> list[tuple[Doc, Doc]]:
    out = []
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            for c in _containers(doc):
                if _argv(doc, c, {"HOSTNAME": "x-0"})[: len(prefix)] == list(prefix):
                    out.append((doc, c))
    return out


def test_every_role_is_deployed(docs: list[Doc]) -> None:
    for role in (["topics", "apply"], ["ps"], ["join"], ["train"], ["publish", "run"],
                 ["snapshot", "run"], ["serve"]):  # fmt: skip
        assert _workloads_running(docs, *role), f"no workload runs pipeline {' '.join(role)}"
    for role in (["publish", "run"], ["snapshot", "run"]):
        for doc, _ in _workloads_running(docs, *role):
            assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] == 1, role


def test_shard_servers_cover_every_shard(docs: list[Doc]) -> None:
    (sts, container), = _workloads_running(docs, "ps")  # fmt: skip
    assert sts["kind"] == "StatefulSet"
    replicas, name = sts["spec"]["replicas"], sts["metadata"]["name"]
    shards = []
    for ordinal in range(replicas):
        argv = _argv(sts, container, {"HOSTNAME": f"{name}-{ordinal}"})
        assert int(option(argv, "--shards")) == replicas, "--shards must equal replicas"
        shards.append(int(option(argv, "--shard")))
        data_dir = option(argv, "--data-dir")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        templates = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        assert any(data_dir.startswith(p) and n in templates for p, n in mounts.items()), (
            "--data-dir must be on a volumeClaimTemplate (one disk per shard)"
        )
    assert shards == list(range(replicas))
    probe = container["readinessProbe"]["exec"]["command"][-1]
    compile(probe, "ps-probe", "exec")
    assert ShardKeys("deep", 7).meta.decode().replace("7", "%s") in probe


def test_snapshot_dir_is_shared_by_coordinator_and_shards(docs: list[Doc]) -> None:
    ((coordinator, c_container),) = _workloads_running(docs, "snapshot", "run")
    directory = option(_argv(coordinator, c_container, {}), "--dir")

    def claim_at(doc: Doc, container: Doc, path: str) -> str:
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
        return str(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])

    claim = claim_at(coordinator, c_container, directory)
    for sts, container in _workloads_running(docs, "ps"):
        assert claim_at(sts, container, directory) == claim
    pvc = _named(docs, "PersistentVolumeClaim")[claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "shards on several nodes share it"
    probe = c_container["livenessProbe"]["exec"]["command"][-1]
    assert snapshot_lock_key("default").decode() in probe
    assert float(option(_argv(coordinator, c_container, {}), "--interval")) < 600


def test_trainers_fit_the_partitions_and_probes_match(
    docs: list[Doc], mounted_files: dict[str, Path]
) -> None:
    partitions = yaml.safe_load((ROOT / "topics/samples.yaml").read_text())["partitions"]
    for doc, container in _workloads_running(docs, "train"):
        assert 1 <= doc["spec"]["replicas"] <= partitions
        port = int(option(_argv(doc, container, {}), "--metrics-port"))
        assert container["readinessProbe"]["httpGet"]["port"] == port
    for doc, container in _workloads_running(docs, "publish", "run"):
        model = option(_argv(doc, container, {}), "--model")
        spec = ModelSpec.from_yaml(mounted_files[model])
        probe = container["livenessProbe"]["exec"]["command"][-1]
        assert publisher_lock_key(spec.name).decode() in probe
    for doc, container in _workloads_running(docs, "serve"):
        port = int(option(_argv(doc, container, {}), "--port"))
        assert port in {p["containerPort"] for p in container["ports"]}


def test_shell_commands_are_checked_not_guessed() -> None:
    with pytest.raises(AssertionError):
        shell_cli_call("exec pipeline ps --shard ${POD_INDEX}", {"HOSTNAME": "ps-0"})
    with pytest.raises(AssertionError):
        shell_cli_call("exec python -m pipeline ps", {})
    assert shell_cli_call("exec pipeline ps --shard ${HOSTNAME##*-}", {"HOSTNAME": "a-b-12"}) == [
        "ps",
        "--shard",
        "12",
    ]


def test_every_container_takes_its_thread_budget_from_its_cpu_limit(docs: list[Doc]) -> None:
    """PIPELINE_THREADS follows limits.cpu, so every role's pools fit its share of the node."""
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for doc in workloads:
        for container in _containers(doc):
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env.get("PIPELINE_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef")
            assert ref == {"resource": "limits.cpu", "divisor": "1"}, doc["metadata"]["name"]
            assert "cpu" in container["resources"].get("limits", {}), doc["metadata"]["name"]


# -- safe by default (docs/security.md) ---------------------------------------------------
# the option that sets each role's listen address (roles bind 127.0.0.1 unless told)
HOST_OPTIONS = {"serve": "--host", "train": "--metrics-host"}


def test_containers_with_ports_listen_on_the_pod_ip(docs: list[Doc]) -> None:
    """A role that binds loopback is unreachable by probes and Services: every container
    that declares a port says --host/--metrics-host 0.0.0.0 explicitly."""
    seen = set()
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in _containers(doc):
            if not container.get("ports"):
                continue
            argv = _argv(doc, container, {"HOSTNAME": "x-0"})
            flag = HOST_OPTIONS.get(argv[0])
            assert flag is not None, f"{doc['metadata']['name']}: a port, but no known listener"
            assert option(argv, flag) == "0.0.0.0", f"{doc['metadata']['name']}: {flag}"
            seen.add(argv[0])
    assert seen == set(HOST_OPTIONS)


def test_http_probes_use_the_open_health_endpoint(docs: list[Doc]) -> None:
    """/predict and /metrics may need a bearer token; kubelet probes carry none."""
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for container in _containers(doc):
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind, {}).get("httpGet")
                if probe is not None:
                    assert probe["path"] == "/health", f"{doc['metadata']['name']} {kind}"


def test_credentials_live_in_the_secret_not_the_configmap(docs: list[Doc]) -> None:
    secret_like = re.compile(r"PASSWORD|TOKEN|SECRET")
    for name, doc in _named(docs, "ConfigMap").items():
        for key, value in (doc.get("data") or {}).items():
            assert not secret_like.search(key) or key.endswith("_FILE"), f"{name}: {key}"
            if "://" in str(value) and key.startswith("PIPELINE_"):
                assert "@" not in str(value), f"{name}: {key} carries credentials"
    for _, container in _workloads_running(docs, "serve"):
        env = {e["name"]: e.get("valueFrom", {}) for e in container.get("env", [])}
        assert "secretKeyRef" in env.get("PIPELINE_SERVE_TOKEN", {}), "serve without a token"
