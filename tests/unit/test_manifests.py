"""Validate the deployable artefacts in serving/: Kubernetes manifests, CRD examples, Dockerfile.

Core kinds are deserialised into the official `kubernetes` client models and serialised back:
a field the model does not know (a typo, a wrong indent) is dropped by the round trip and fails
the test. Argo Rollouts, Flagger and Kustomize objects have no client models, so their structure
is checked against the documented fields we rely on. The RBAC test runs every actuator action
against a recording API client and demands that the Role grants exactly those calls.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")

REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "serving"
K8S = SERVING / "k8s"
EXAMPLES = SERVING / "examples"
CRONJOB = K8S / "cronjob-retrain.yaml"

HTTP_PORT = 8080
CONTROLLER_HOST = "canaryml-controller.canaryml.svc.cluster.local"

# The permissions the controller needs: (apiGroup, resource, verb). This MUST match the calls the
# actuators make — test_rbac_matches_the_actuators_calls derives the same set from them.
EXPECTED_RBAC = frozenset({
    ("apps", "deployments", "get"),
    ("apps", "deployments", "patch"),
    ("argoproj.io", "rollouts", "get"),
    ("argoproj.io", "rollouts", "patch"),
    ("argoproj.io", "rollouts/status", "patch"),
})
WORKLOAD_WRITE_VERBS = {"create", "update", "delete", "deletecollection", "*"}


def _yaml_files() -> list[Path]:
    return sorted(SERVING.rglob("*.yaml")) + sorted(SERVING.rglob("*.yml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _yaml_files() for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _all_docs() if d.get("kind") == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} under serving/, found {len(found)}"
    return found[0]


CORE_MODELS = {  # (apiVersion, kind) -> kubernetes.client model
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Secret"): "V1Secret",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("batch/v1", "CronJob"): "V1CronJob",
    ("batch/v1", "Job"): "V1Job",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}
CRD_KINDS = {
    ("argoproj.io/v1alpha1", "AnalysisTemplate"),
    ("argoproj.io/v1alpha1", "Rollout"),
    ("flagger.app/v1beta1", "Canary"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    # serving/monitoring and the Prometheus-provider examples: test_observability_files.py
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("flagger.app/v1beta1", "MetricTemplate"),
}


def _roundtrip(doc: dict[str, Any], model: str) -> dict[str, Any]:
    api = kubernetes.client.ApiClient()
    obj = api.deserialize(json.dumps(doc), model, "application/json")
    assert type(obj).__name__ == model
    return api.sanitize_for_serialization(obj)


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


# -- every document ------------------------------------------------------------------------
@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(SERVING)))
def test_every_document_is_a_known_kind_and_survives_the_model_round_trip(path: Path) -> None:
    for doc in _docs(path):
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in CORE_MODELS or key in CRD_KINDS, (
            f"{path.name}: {key} has neither a client model nor a structural check here")
        if key in CRD_KINDS:
            continue
        if key[1] != "Namespace":
            assert "namespace" not in doc["metadata"] or key[1] == "CronJob", (
                f"{path.name}: leave metadata.namespace to kustomize / `kubectl -n`")
        back = _roundtrip(doc, CORE_MODELS[key])
        assert back == _strip_nulls(json.loads(json.dumps(doc))), (
            f"{path.name}: {key[1]} lost or changed fields in the kubernetes model round trip "
            "(unknown field or wrong nesting)")


def test_round_trip_catches_an_unknown_field() -> None:
    doc = json.loads(json.dumps(_controller()))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # the typo users make
    assert _roundtrip(doc, "V1Deployment") != _strip_nulls(doc)


def test_kustomization_lists_every_manifest() -> None:
    kust = _one("Kustomization")
    listed = set(kust["resources"])
    optional = {"role-discovery.yaml",  # opt-in, see test_discovery_role_matches_the_discovery_calls
                "replay-indexed-job.yaml"}  # applied per replay run (test_replay_k8s_job.py)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - optional
    assert listed == on_disk
    assert kust["namespace"] == _one("Namespace")["metadata"]["name"] == "canaryml"


# -- the controller Deployment -------------------------------------------------------------
def _controller() -> dict[str, Any]:
    return _one("Deployment", "canaryml-controller")


def _container() -> dict[str, Any]:
    (container,) = _controller()["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_is_hardened_and_probed() -> None:
    pod = _controller()["spec"]["template"]["spec"]
    container = _container()
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # issue 16 #4: /healthz is 503 while Prometheus or MLflow is down; probing liveness (or
    # startup) on it would restart a controller that is correctly pausing, in a loop
    paths = {probe: container[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez",
                     "readinessProbe": "/healthz"}
    for probe in paths:
        assert container[probe]["httpGet"]["port"] in ("http", HTTP_PORT)
    assert container["ports"] == [{"name": "http", "containerPort": HTTP_PORT,
                                   "protocol": "TCP"}]
    assert container["args"][0] == "serve"
    env = {e["name"]: e for e in container["env"]}
    assert env["CANARYML_HTTP_HOST"]["value"] == "0.0.0.0"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"]
    token_path = Path(env["CANARYML_HTTP_TOKEN_FILE"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_mount = next(m for m in mounts.values() if m["mountPath"] == str(token_path.parent))
    assert token_mount["readOnly"] is True
    assert "secret" in volumes[token_mount["name"]]
    # writable paths under a read-only root: state volume and /tmp only
    writable = {m["mountPath"] for m in mounts.values() if not m.get("readOnly")}
    assert writable == {"/var/lib/canaryml", "/tmp"}


def test_configmap_composes_with_the_deployment_args(tmp_path: Path) -> None:
    """Mount the ConfigMap the way the pod does and compose the real config with the pod's args."""
    from canaryml.cli import compose

    pod = _controller()["spec"]["template"]["spec"]
    container = _container()
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    data = _one("ConfigMap", config_volume["configMap"]["name"])["data"]
    root = tmp_path / mount["mountPath"].lstrip("/")
    for item in config_volume["configMap"]["items"]:
        target = root / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])
    args = [a.replace(f"file://{mount['mountPath']}", f"file://{root}")
            for a in container["args"][1:]]
    cfg = compose("serve", args)
    assert cfg.serve.http.host == "0.0.0.0"
    assert cfg.serve.http.port == HTTP_PORT
    assert str(cfg.serve.decision_log).startswith("/var/lib/canaryml/")
    assert cfg.serve.lookback == compose("serve").serve.lookback  # defaults still composed


def test_service_selects_the_controller_pods_on_the_http_port() -> None:
    svc = _one("Service", "canaryml-controller")
    pod_labels = _controller()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert _controller()["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == HTTP_PORT and port["targetPort"] == "http"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # degraded != unreachable


# -- RBAC ----------------------------------------------------------------------------------
def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def test_role_grants_exactly_the_expected_permissions() -> None:
    role = _one("Role", "canaryml-controller")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in Role rule {rule}"
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}
    granted = _granted(role)
    assert granted == EXPECTED_RBAC
    assert not {v for _, _, v in granted} & WORKLOAD_WRITE_VERBS
    binding = _one("RoleBinding", "canaryml-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "canaryml-controller",
                                    "namespace": "canaryml"}]
    assert not [d for _, d in _all_docs() if d.get("kind") in ("ClusterRole",
                                                               "ClusterRoleBinding")]


_VERBS = {"GET": "get", "PATCH": "patch", "POST": "create", "PUT": "update", "DELETE": "delete"}


def _permission(method: str, url: str) -> tuple[str, str, str]:
    """Map a Kubernetes REST request to the (apiGroup, resource, verb) RBAC checks."""
    parts = urlsplit(url)
    segs = parts.path.strip("/").split("/")
    if segs[0] == "api":  # core group: /api/v1/namespaces/NS/RES[/NAME[/SUB]]
        group, rest = "", segs[2:]
    else:  # /apis/GROUP/VERSION/namespaces/NS/RES[/NAME[/SUB]]
        group, rest = segs[1], segs[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    verb = _VERBS[method]
    if method == "GET" and len(rest) == 1:
        verb = "watch" if "true" in parse_qs(parts.query).get("watch", []) else "list"
    return group, resource, verb


def _recording_client(calls: list[tuple[str, str]], answer: dict[str, Any]) -> Any:
    """A kubernetes ApiClient that records (method, url) and answers every call with `answer`."""
    import urllib3
    from kubernetes.client.rest import RESTResponse

    class Recording(kubernetes.client.ApiClient):
        def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            calls.append((method, url))
            raw = urllib3.HTTPResponse(body=json.dumps(answer).encode(), status=200,
                                       headers={"Content-Type": "application/json"},
                                       preload_content=True)
            response = RESTResponse(raw)
            response.read()
            return response

    return Recording(kubernetes.client.Configuration(host="http://127.0.0.1:9"))


def test_rbac_matches_the_actuators_calls() -> None:
    """Run every actuator action against a recording client; the Role must cover exactly that."""

    from canaryml.control.types import Action, Decision
    from canaryml.serving import actuators

    calls: list[tuple[str, str]] = []
    client = _recording_client(calls, {
        "metadata": {"name": "x", "annotations": {}},
        "spec": {"replicas": 4, "strategy": {"canary": {"steps": [{"setWeight": 20}]}}},
        "status": {"currentStepIndex": 0}})
    exercised = [
        actuators.DeploymentActuator(
            client, {"d": actuators.DeploymentTarget("demo", "web-canary", "web")}, retries=0),
        actuators.ArgoRolloutActuator(
            client, {"d": actuators.RolloutTarget("demo", "web")}, retries=0),
    ]
    for actuator in exercised:
        for step, action in enumerate(Action):
            actuator.apply("d", Decision(action, "test", 0.9), step)
    derived = {_permission(m, u) for m, u in calls}
    assert derived == EXPECTED_RBAC, (
        f"actuator calls need {sorted(derived)}; update EXPECTED_RBAC and serving/k8s/role.yaml")


def test_discovery_role_matches_the_discovery_calls() -> None:
    """`serve.discover` lists Deployments or Rollouts; its optional Role grants exactly that."""

    from canaryml.tasks.serve import KubeDiscovery

    calls: list[tuple[str, str]] = []
    client = _recording_client(calls, {"items": []})
    for kind in ("deployment", "argo"):
        assert KubeDiscovery(client, "demo", "canaryml.io/track=canary", kind=kind).discover() == []
    role = _one("Role", "canaryml-discovery")
    assert {_permission(m, u) for m, u in calls} == _granted(role)
    binding = _one("RoleBinding", "canaryml-discovery")
    assert binding["roleRef"]["name"] == "canaryml-discovery"
    assert "role-discovery.yaml" not in _one("Kustomization")["resources"]  # opt-in only


def test_no_other_kubernetes_api_usage_outside_the_exercised_actuators() -> None:
    """A new API call elsewhere in the controller must be added to the RBAC tests above."""
    pattern = re.compile(r"\b(CoreV1Api|AppsV1Api|CustomObjectsApi|BatchV1Api|EventsV1Api|"
                         r"CoordinationV1Api|watch\.Watch|DynamicClient)\b")
    exercised = {"actuators.py", "service.py"}  # service.py: KubeDiscovery (tested above)
    offenders = [p.relative_to(REPO) for p in (REPO / "src" / "canaryml").rglob("*.py")
                 if p.name not in exercised and pattern.search(p.read_text())]
    assert offenders == [], f"Kubernetes API used in {offenders}: exercise it in this test"


# -- Argo Rollouts ---------------------------------------------------------------------------
WEB_PROVIDER_FIELDS = {"url", "method", "headers", "body", "jsonBody", "timeoutSeconds",
                       "jsonPath", "insecure", "authentication"}
METRIC_FIELDS = {"name", "interval", "initialDelay", "count", "successCondition",
                 "failureCondition", "failureLimit", "inconclusiveLimit",
                 "consecutiveErrorLimit", "consecutiveSuccessLimit", "provider", "dryRun"}


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|h)", text)
    assert match, f"bad duration {text!r}"
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def test_analysis_template_uses_the_web_provider_against_the_verdict_endpoint() -> None:
    tmpl = _one("AnalysisTemplate", "canaryml-verdict")
    declared = {a["name"]: a for a in tmpl["spec"]["args"]}
    (metric,) = tmpl["spec"]["metrics"]
    assert set(metric) <= METRIC_FIELDS
    web = metric["provider"]["web"]
    assert set(metric["provider"]) == {"web"} and set(web) <= WEB_PROVIDER_FIELDS
    url = urlsplit(web["url"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http", CONTROLLER_HOST, HTTP_PORT, "/api/v1/argo/verdict")
    assert set(parse_qs(url.query)) == {"namespace", "rollout", "canary_hash", "stable_hash"}
    used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", json.dumps(web)))
    assert used == set(declared), "every {{args.X}} must be declared and every arg used"
    assert web["method"] == "GET" and web["jsonPath"] == "{$}"
    assert {"key": "Authorization", "value": "Bearer {{args.canaryml-token}}"} in web["headers"]
    assert "secretKeyRef" in declared["canaryml-token"]["valueFrom"]
    assert web["timeoutSeconds"] < _duration_s(metric["interval"])
    assert metric["successCondition"] == 'result.verdict == "pass"'
    assert metric["failureCondition"] == 'result.verdict == "fail"'
    assert metric["consecutiveErrorLimit"] <= 4  # the 5th consecutive error aborts
    assert metric["inconclusiveLimit"] >= 1  # a degraded controller answers inconclusive


def test_rollout_example_passes_every_required_analysis_arg() -> None:
    rollout = _one("Rollout", "web")
    tmpl = _one("AnalysisTemplate", "canaryml-verdict")
    required = {a["name"] for a in tmpl["spec"]["args"] if "value" not in a
                and "valueFrom" not in a}
    analysis = rollout["spec"]["strategy"]["canary"]["analysis"]
    assert analysis["templates"] == [{"templateName": tmpl["metadata"]["name"]}]
    passed = {a["name"]: a for a in analysis["args"]}
    assert set(passed) == required
    assert passed["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
    assert passed["stable-hash"]["valueFrom"] == {"podTemplateHashValue": "Stable"}
    # the pod template is a core PodTemplateSpec: validate it with the client model
    template = rollout["spec"]["template"]
    assert _roundtrip(template, "V1PodTemplateSpec") == _strip_nulls(template)


# -- Flagger ---------------------------------------------------------------------------------
FLAGGER_WEBHOOK_TYPES = {"confirm-rollout", "pre-rollout", "rollout", "confirm-traffic-increase",
                         "confirm-promotion", "post-rollout", "rollback", "event"}


def test_flagger_canary_calls_the_rollout_check_and_rollback_webhooks() -> None:
    canary = _one("Canary", "web")
    assert canary["spec"]["targetRef"]["kind"] in ("Deployment", "DaemonSet")
    analysis = canary["spec"]["analysis"]
    assert {"interval", "threshold", "webhooks"} <= set(analysis)
    hooks = {h["type"]: h for h in analysis["webhooks"]}
    assert set(hooks) <= FLAGGER_WEBHOOK_TYPES
    for hook in analysis["webhooks"]:
        assert set(hook) <= {"name", "type", "url", "timeout", "metadata", "muteAlert", "retries"}
        assert _duration_s(hook["timeout"]) < _duration_s(analysis["interval"])
    for kind, path in (("rollout", "/api/v1/flagger/rollout-check"),
                       ("rollback", "/api/v1/flagger/rollback")):
        url = urlsplit(hooks[kind]["url"])
        assert (url.hostname, url.port, url.path) == (CONTROLLER_HOST, HTTP_PORT, path)
        assert all(isinstance(v, str) for v in hooks[kind].get("metadata", {}).values())


# -- retraining CronJob ----------------------------------------------------------------------
def _retrain_pod() -> dict[str, Any]:
    (job,) = [d for d in _docs(CRONJOB) if d.get("kind") == "CronJob"]
    return dict(job["spec"]["jobTemplate"]["spec"]["template"]["spec"])


def test_retrain_cronjob_is_valid() -> None:
    (job,) = [d for d in _docs(CRONJOB) if d.get("kind") == "CronJob"]
    assert _roundtrip(job, "V1CronJob") == _strip_nulls(json.loads(json.dumps(job)))
    assert len(job["spec"]["schedule"].split()) == 5
    pod = _retrain_pod()
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    # admitted by a `restricted` namespace (Pod Security Standards)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_retrain_cronjob_runs_with_the_controllers_image_secret_and_kustomization() -> None:
    """issue 15 #5: the documented secret key, the kustomization's image, listed in it."""
    (c,) = _retrain_pod()["containers"]
    kust = _one("Kustomization")
    assert CRONJOB.name in kust["resources"] and CRONJOB.parent == K8S
    assert c["image"] == _container()["image"]
    (image,) = kust["images"]
    assert c["image"] == f"{image['name']}:{image['newTag']}"
    env = {e["name"]: e for e in c["env"]}
    ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]
    controller_ref = {e["name"]: e for e in _container()["env"]}[
        "MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == controller_ref == {"name": "canaryml-mlflow", "key": "tracking-uri"}
    readme = (SERVING / "README.md").read_text()
    assert "--from-literal=tracking-uri=" in readme  # what the docs tell users to create


def test_retrain_ingest_config_says_which_deployments_to_pull(tmp_path: Path) -> None:
    """Mount the retrain ConfigMap as the CronJob does and compose `canaryml ingest` with the
    job's own arguments: the deployments table, Prometheus, and serve's queries."""
    from canaryml.cli import compose
    from canaryml.data.contract import read_deployments
    from canaryml.ingest.prometheus import render

    pod = _retrain_pod()
    (c,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    data = _one("ConfigMap", volume["configMap"]["name"])["data"]
    root = tmp_path / mount["mountPath"].lstrip("/")
    for item in volume["configMap"]["items"]:
        (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / item["path"]).write_text(data[item["key"]])
    script = " ".join(c["args"])
    ingest = re.search(r"canaryml ingest (.*?) &&", script)
    assert ingest is not None, script
    args = [a.replace("file:///etc/canaryml", f"file://{root}") for a in ingest.group(1).split()]
    assert "source=prometheus" in args
    cfg = compose("ingest", [a for a in args if not a.startswith("out=")])
    prom = cfg.ingest.prometheus
    table = Path(str(prom.deployments_file).replace(mount["mountPath"], str(root)))
    assert table.is_file()
    deps = read_deployments(table)
    assert len(deps) >= 1 and {"deployment_id", "service", "start", "end"} <= set(deps.columns)
    # every catalog metric, with the controller's queries: the retrained model can be served
    assert dict(prom.queries) == dict(cfg.serve.source.prometheus.queries)
    assert set(prom.queries) == set(cfg.metrics)
    assert "{service}" in prom.selectors.canary and render(prom.queries.latency_p99, "x")


def test_forwarder_deployment_composes_and_is_hardened(tmp_path: Path) -> None:
    """The forwarder reads the controller's ConfigMap: mount it, compose `canaryml forward`
    with the pod's args; probes on /livez (liveness) and /healthz (readiness)."""
    from canaryml.cli import compose

    dep = _one("Deployment", "canaryml-forwarder")
    assert dep["metadata"]["name"] != _controller()["metadata"]["name"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == _container()["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    data = _one("ConfigMap", volume["configMap"]["name"])["data"]
    root = tmp_path / mount["mountPath"].lstrip("/")
    for item in volume["configMap"]["items"]:
        (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / item["path"]).write_text(data[item["key"]])
    assert c["args"][0] == "forward"
    cfg = compose("forward", [a.replace(f"file://{mount['mountPath']}", f"file://{root}")
                              for a in c["args"][1:]])
    assert cfg.forward.http.port == c["ports"][0]["containerPort"]
    assert c["livenessProbe"]["httpGet"]["port"] == c["ports"][0]["name"]
    assert cfg.forward.kafka.topic == cfg.serve.source.kafka.topic  # one topic, both ends
    assert cfg.forward.prometheus.url == cfg.serve.source.prometheus.url
    assert set(cfg.forward.prometheus.queries) == set(cfg.metrics)


def test_network_policy_admits_only_the_callers_on_the_http_port() -> None:
    pol = _one("NetworkPolicy")
    assert _roundtrip(pol, "V1NetworkPolicy") == _strip_nulls(json.loads(json.dumps(pol)))
    pods = _controller()["spec"]["template"]["metadata"]["labels"]
    sel = pol["spec"]["podSelector"]["matchLabels"]
    assert sel.items() <= pods.items()  # it selects the controller pods
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"port": HTTP_PORT, "protocol": "TCP"}]
    assert _container()["ports"][0]["containerPort"] == HTTP_PORT
    assert all("namespaceSelector" in peer for peer in rule["from"])


def test_pinned_role_example_is_role_yaml_plus_resource_names() -> None:
    (role,) = _docs(EXAMPLES / "role-resource-names.yaml")
    base = _one("Role", "canaryml-controller")
    assert [{k: v for k, v in r.items() if k != "resourceNames"} for r in role["rules"]] \
        == base["rules"]
    assert all(r["resourceNames"] for r in role["rules"])


# -- Dockerfile ------------------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = pending.strip().partition(" ")
            out.append((op.upper(), args.strip()))
            pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return out


def test_dockerfile_lints() -> None:
    steps = _instructions(SERVING / "Dockerfile")
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for i in froms:
        assert steps[i][1].split()[0] == "python:3.11-slim"
    final = steps[froms[-1]:]
    runs = [args for op, args in steps if op == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch < project, "install the CPU torch wheel before the project"
    assert "torch==2.13.0" in runs[torch]
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = int(users[-1].split(":")[0])
    assert uid == _controller()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    (entrypoint,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    assert entrypoint == ["canaryml"]
    assert [a for op, a in final if op == "EXPOSE"] == [str(HTTP_PORT)]
    (health,) = [a for op, a in final if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{HTTP_PORT}/livez" in health  # Swarm replaces unhealthy tasks
    assert any(op == "COPY" and a.startswith("--from=") for op, a in final)
    env = " ".join(a for op, a in final if op == "ENV")
    assert "CANARYML_CONF=/opt/canaryml/conf" in env
    for op, args in steps:  # every COPY source from the build context exists in the repo
        if op == "COPY" and not args.startswith("--from="):
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    ignore = (SERVING / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!src/" in ignore and "!conf/" in ignore
