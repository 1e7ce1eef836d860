"""deploy/: the KServe manifests checked against KServe's and Kubernetes' own API schemas (the OpenAPI models
the `kserve` and `kubernetes` Python packages are generated from), and kept consistent with the daemon's
config and the container recipe. Kubernetes itself is not available here: this is what can be checked."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import FIELDS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# kserve and tritonclient (test_oip.py) register the same protobuf messages ("inference.*"), and one process
# cannot import both: the schema check runs in an interpreter of its own.
_CHECKER = r"""
import json, re, sys
import kserve.models, kubernetes.client.models

PRIMITIVE = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str,
             "date": str, "ResourceQuantity": (str, int, float), "IntOrString": (str, int)}

def model(name):
    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise SystemExit(f"no API model {name}")

def check(value, t, path):
    t = t.strip()
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", t):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value) for p in check(v, m.group(1), f"{path}[{i}]")]
    if m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", t):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        return [p for k, v in value.items() for p in check(v, m.group(1) or m.group(2), f"{path}.{k}")]
    if t in PRIMITIVE:
        ok = isinstance(value, PRIMITIVE[t]) and not (t == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {t}, got {value!r}"]
    cls = model(t)
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({t}), got {value!r}"]
    by_json = {j: a for a, j in cls.attribute_map.items()}
    out = []
    for key, v in value.items():
        if key not in by_json:
            out.append(f"{path}.{key}: not a field of {t}")
        else:
            out += check(v, cls.openapi_types[by_json[key]], f"{path}.{key}")
    return out

doc, type_name = json.load(sys.stdin)
print(json.dumps(check(doc, type_name, type_name)))
"""


def check(doc: dict[str, Any], type_name: str) -> list[str]:
    """Problems of `doc` against the OpenAPI model `type_name` of kserve / kubernetes (unknown fields,
    wrong types), from the packages' generated API models."""
    proc = subprocess.run([sys.executable, "-c", _CHECKER], input=json.dumps([doc, type_name]), text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout))


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kserve" / name).read_text()) if d]


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-grpc.yaml"])
def test_inference_service_matches_kserve_schema(name: str) -> None:
    (isvc,) = _docs(name)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert check(isvc, "V1beta1InferenceService") == []
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe routes to
    ports = container["ports"]
    assert len(ports) == 1 and ports[0]["name"] in ("http1", "h2c")  # KServe's port names for REST / gRPC
    config = tomllib.loads(_docs("config.yaml")[0]["data"]["config.toml"])
    want = config["oip_http_port"] if ports[0]["name"] == "http1" else config["oip_grpc_port"]
    assert ports[0]["containerPort"] == want
    # readiness is the daemon's own: the front end's v2 ready endpoint, on its REST port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": config["oip_http_port"]}
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(annotations["prometheus.kserve.io/port"]) == config["metrics_port"]
    assert container["args"] == ["--config", "/etc/dlrm-daemon/config.toml"]


def test_check_catches_what_kubernetes_would_refuse() -> None:
    (isvc,) = _docs("inferenceservice.yaml")
    isvc["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}  # a typo
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    problems = check(isvc, "V1beta1InferenceService")
    assert any("readinesProbe: not a field of V1Container" in p for p in problems), problems
    assert any("minReplicas: expected int" in p for p in problems), problems


def test_config_map_holds_a_daemon_config() -> None:
    (cm,) = _docs("config.yaml")
    assert check(cm, "V1ConfigMap") == []
    config = tomllib.loads(cm["data"]["config.toml"])
    assert set(config) <= set(FIELDS), set(config) - set(FIELDS)
    # beyond loopback inside a pod only with allow_remote (the daemon refuses otherwise)
    assert config["oip_host"] == "0.0.0.0" and config["allow_remote"] is True


def test_container_recipe_carries_every_package_and_port() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), package
    config = tomllib.loads(_docs("config.yaml")[0]["data"]["config.toml"])
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}  # type: ignore[union-attr]
    assert {config["oip_http_port"], config["oip_grpc_port"], config["metrics_port"]} <= exposed
    assert '".[gpu,oip]"' in text
