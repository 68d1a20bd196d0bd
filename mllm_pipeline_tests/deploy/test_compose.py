"""docker-compose.yml, the Dockerfiles and workspace.yaml, checked without a Docker engine: structure, wiring
between services, variable interpolation the way `docker compose config` does it, and that what the files name
(COPY sources, CLI commands, the instance config) exists and is valid."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mllm_pipeline_tests.deploy.conftest import REPO
from mllm_pipeline_tests.deploy.instance_config import validated_instance_config

COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker" / "compose.gpu.yml"
ENV_EXAMPLE = REPO / "docker" / "env.example"
LONG_RUNNING = {"postgres", "minio", "user-code", "webserver", "daemon"}
ONE_SHOT = {"minio-init", "video2dataset"}
DAGSTER_PG = {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


class MissingVariable(KeyError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = env.get(name)
        unset = have is None or (have == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else have
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return have
        return have or ""

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip()
    return env


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def rendered(compose) -> dict:
    return interpolate(compose, read_env_file(ENV_EXAMPLE))


def test_services_and_their_images(compose):
    services = compose["services"]
    assert LONG_RUNNING | ONE_SHOT == set(services)
    for name in ("user-code", "webserver", "daemon"):
        build = services[name]["build"]
        assert build["context"] == "." and build["dockerfile"] == "docker/Dockerfile"
        assert build["additional_contexts"] == {"v2d": "service:video2dataset"}
    assert services["video2dataset"]["build"]["dockerfile"] == "docker/Dockerfile.video2dataset"
    assert services["user-code"]["build"]["args"]["DAGSTER_VERSION"] == services["video2dataset"]["build"]["args"]["DAGSTER_VERSION"]
    assert len({services[n]["image"] for n in ("user-code", "webserver", "daemon")}) == 1
    for name, svc in services.items():
        dockerfile = svc.get("build", {}).get("dockerfile")
        if dockerfile:
            assert (REPO / svc["build"]["context"] / dockerfile).is_file(), f"{name}: {dockerfile} is missing"
    assert services["postgres"]["image"].startswith("postgres:")


def test_environment_wiring(compose, rendered):
    services = rendered["services"]
    for name in ("user-code", "webserver", "daemon"):
        env = services[name]["environment"]
        assert DAGSTER_PG <= set(env), name
        assert env["DAGSTER_PG_HOST"] == "postgres" and env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    pg = services["postgres"]["environment"]
    uc = services["user-code"]["environment"]
    assert (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]) == (
        uc["DAGSTER_PG_USERNAME"], uc["DAGSTER_PG_PASSWORD"], uc["DAGSTER_PG_DB"])
    # the storage root is a bucket in MinIO, reached by service name, with MinIO's credentials
    assert uc["MLLM_STORAGE_ROOT"] == "s3://mllm/pipeline"
    assert uc["MLLM_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio = services["minio"]["environment"]
    assert (uc["AWS_ACCESS_KEY_ID"], uc["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert uc["MLLM_VIDEO2DATASET_PYTHON"] == "/opt/video2dataset/bin/python"
    init = services["minio-init"]
    assert "mc mb --ignore-existing" in init["command"][0] and "$MLLM_BUCKET" in init["command"][0]
    assert init["environment"]["MLLM_BUCKET"] == uc["MLLM_STORAGE_ROOT"].split("/")[2]


def test_secrets_are_required_not_defaulted(compose):
    """Every password in the file is ${VAR:?...}: compose refuses to start without it, nothing has a default."""
    text = COMPOSE.read_text()
    for m in re.finditer(r"(\w*(?:PASSWORD|SECRET)\w*):\s*(.+)", text):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", m.group(2).strip()), m.group(0)
    with pytest.raises(MissingVariable, match="DAGSTER_PG_PASSWORD"):
        interpolate(compose, {})
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= set(read_env_file(ENV_EXAMPLE)), "env.example must show every required variable"


def test_ports_bind_to_loopback_by_default(compose):
    env = {k: v for k, v in read_env_file(ENV_EXAMPLE).items() if k != "MLLM_BIND"}
    published = {name: svc.get("ports", []) for name, svc in interpolate(compose, env)["services"].items()}
    assert published == {
        "postgres": [], "minio": ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"], "minio-init": [],
        "video2dataset": [], "user-code": [], "webserver": ["127.0.0.1:3000:3000"], "daemon": [],
    }
    opened = interpolate(compose, {**env, "MLLM_BIND": "0.0.0.0", "MLLM_UI_PORT": "8080"})
    assert opened["services"]["webserver"]["ports"] == ["0.0.0.0:8080:3000"]


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert services[name]["restart"] == "unless-stopped"
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but it has no healthcheck"
            else:
                assert cond["condition"] == "service_completed_successfully" and dep in ONE_SHOT
    assert services["user-code"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["user-code"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_volumes_are_declared(compose):
    declared = set(compose["volumes"])
    used = set()
    for svc in compose["services"].values():
        for v in svc.get("volumes", []):
            source = v.split(":", 1)[0]
            assert not source.startswith(("/", ".")), f"bind mount {v}: use a named volume"
            used.add(source)
    assert used == declared == {"pgdata", "miniodata", "dagster_storage"}


def test_gpu_override_reserves_the_gpu_for_the_user_code():
    override = yaml.safe_load(GPU_OVERRIDE.read_text())
    (device,) = override["services"]["user-code"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert interpolate(device, {})["count"] == "all"


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.video2dataset"])
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(name):
    path = REPO / "docker" / name
    instructions = _dockerfile_instructions(path)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    allowed = [line[1:].rstrip("/") for line in (REPO / "docker" / f"{name}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for word, rest in instructions:
        if word != "COPY":
            continue
        args = shlex.split(rest)
        if any(a.startswith("--from=") for a in args):
            continue
        for src in [a for a in args if not a.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
            assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), (
                f"{name}: COPY {src} is excluded by {name}.dockerignore")


def test_main_image_wiring():
    instructions = _dockerfile_instructions(REPO / "docker" / "Dockerfile")
    text = " ".join(f"{w} {r}" for w, r in instructions)
    assert "ffmpeg" in text and '".[deploy]"' in text
    assert "COPY --from=v2d /opt/video2dataset /opt/video2dataset" in text
    assert "ENV MLLM_VIDEO2DATASET_PYTHON=/opt/video2dataset/bin/python" in text
    assert "COPY docker/dagster.yaml /opt/dagster/dagster_home/dagster.yaml" in text
    assert "ENV DAGSTER_HOME=/opt/dagster/dagster_home" in text
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(d.startswith("dagster-postgres") for d in pyproject["project"]["optional-dependencies"]["deploy"])
    v2d = " ".join(f"{w} {r}" for w, r in _dockerfile_instructions(REPO / "docker" / "Dockerfile.video2dataset"))
    for pin in ('"video2dataset==1.3.0"', '"pyarrow<18"', '"dagster-pipes==${DAGSTER_VERSION}"'):
        assert pin in v2d


def test_workspace_points_at_the_user_code_server(compose):
    workspace = yaml.safe_load((REPO / "docker" / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    command = compose["services"]["user-code"]["command"]
    assert grpc["host"] == "user-code" and str(grpc["port"]) == command[command.index("-p") + 1]
    location = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["code_location_name"]
    assert grpc["location_name"] == location == command[command.index("--location-name") + 1]
    assert "-w /opt/dagster/app/workspace.yaml" in " ".join(compose["services"]["webserver"]["command"])
    assert "-w /opt/dagster/app/workspace.yaml" in compose["services"]["daemon"]["command"][0]


def test_instance_config_in_the_image_is_valid():
    config = validated_instance_config(REPO / "docker" / "dagster.yaml")
    assert "postgres" in config["storage"] and config["run_monitoring"]["enabled"]


def test_service_commands_are_real_cli_commands(compose):
    """Each Dagster command the services run exists with the options given (checked with --help)."""
    services = compose["services"]
    commands = [
        services["user-code"]["command"],
        services["webserver"]["command"],
        services["user-code"]["healthcheck"]["test"][1:],
        services["daemon"]["healthcheck"]["test"][1:],
        ["dagster", "instance", "concurrency", "set", "downloads", "4"],
        ["dagster-daemon", "run", "-w", "/opt/dagster/app/workspace.yaml"],
    ]
    bindir = Path(sys.executable).parent
    for argv in commands:
        words = [a for a in argv if not a.startswith("-")][:3] if argv[0] == "dagster" else argv[:1] + [
            a for a in argv[1:2] if not a.startswith("-")]
        exe = str(bindir / words[0])
        out = subprocess.run([exe, *words[1:], "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (argv, out.stderr[-500:])
        for opt in [a for a in argv if a.startswith("-")]:
            assert opt in out.stdout, f"{' '.join(argv)}: {opt} is not an option of {' '.join(words)}"
