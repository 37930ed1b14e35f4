"""deploy/: every image, compose file, Kubernetes manifest and systemd unit parses, runs real `crossview` verbs
with valid flags, and mounts configs that the services' own loaders accept, with every path in them inside
what the container or unit can reach (writable where the service writes).

No Docker engine or cluster here: images are not built and nothing is applied. What is checked instead: the
Dockerfile's install lines against pyproject's extras, the extras against what each service imports, the edge
and matcher import paths without torch, `kubectl kustomize` (when kubectl is installed) and `systemd-analyze
verify` (when present). An adapt config is checked with the train config it names, and the URLs and tokens the
edges and the adapt job reach the matcher with against the matcher's. A real venv install of the matcher's extras
runs with CROSSVIEW_VENV_CHECK=1 (a few minutes).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path, PurePosixPath

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from crossview.adapt import load_adapt_config
from crossview.cli import build_parser
from crossview.kernel.config import load_edge_config, load_matcher_config
from crossview.trainer.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

LOADERS = {"edge": load_edge_config, "matcher": load_matcher_config, "train": load_train_config,
           "adapt": load_adapt_config}
ENV = {"CAM_PASS": "not-a-password"}  # ${CAM_PASS} in the example camera URLs


# --- shared checks -------------------------------------------------------------------------------------------

def parse_cli(argv: list[str], where: str):
    """`crossview ARGV` as the real parser reads it; a bad verb or flag fails naming where it was found."""
    parser = build_parser()
    try:
        args = parser.parse_args([str(a) for a in argv])
    except SystemExit:
        pytest.fail(f"{where}: `crossview {shlex.join(argv)}` is not a valid crossview command")
    # argparse takes `--conf` for `--config`: a file here spells every flag out.
    known, level = set(), parser
    while level is not None:  # the verb's parser, and its action's (`models status`) when it has actions
        known |= {o for a in level._actions for o in a.option_strings}
        subs = [a for a in level._actions if isinstance(a, argparse._SubParsersAction)]
        level = subs[0].choices[getattr(args, subs[0].dest)] if subs else None
    for token in argv:
        flag = str(token).split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in known, f"{where}: `crossview {shlex.join(argv)}`: {flag} is not spelled as a flag of {args.verb}"
    return args


def commands_of(argv: list[str], where: str) -> tuple[str, Path | None]:
    """(verb, --config) of the crossview command a container or unit runs."""
    assert argv, f"{where}: no command"
    assert PurePosixPath(argv[0]).name == "crossview", f"{where}: runs {argv[0]}, not crossview"
    args = parse_cli(argv[1:], where)
    return args.verb, getattr(args, "config", None)


def config_paths(verb: str, cfg) -> list[tuple[str, Path, bool]]:
    """(key, path, written by the service) of every file or folder a loaded config names."""
    if verb == "edge":
        # The registry rollout renames each new version over embedder.model: then its folder is written.
        rollout = cfg.embedder.registry.url is not None
        out = [("embedder.model", cfg.embedder.model.parent if rollout else cfg.embedder.model, rollout),
               ("publisher.spool_dir", cfg.publisher.spool_dir, True), ("harvest.dir", cfg.harvest.dir, True)]
        out += [("detector.weights", cfg.detector.weights, False)] if cfg.detector.weights else []
        sec = cfg.publisher.security
        out += [("publisher.security.secret_key", sec.secret_key, False), ("publisher.security.server_key", sec.server_key, False)]
        out += [(key, token, False) for key, token in (("embedder.registry.token_file", cfg.embedder.registry.token_file),
                                                       ("harvest.upload.token_file", cfg.harvest.upload.token_file)) if token]
    elif verb == "matcher":
        sec = cfg.ingest.security
        out = [("data_dir", cfg.data_dir, True), ("ingest.security.secret_key", sec.secret_key, False),
               ("ingest.security.allowed_clients", sec.allowed_clients, False), ("http.token_file", cfg.http.token_file, False)]
        out += [("http.edge_token_file", cfg.http.edge_token_file, False)] if cfg.http.edge_token_file else []
        out += [(f"models.{i}", m, False) for i, m in enumerate(cfg.models)]
    elif verb == "adapt":
        out = [("state_dir", cfg.state_dir, True), ("train", cfg.train, False), ("matcher.token_file", cfg.matcher.token_file, False)]
        out += [("baseline_model", cfg.baseline_model, False)] if cfg.baseline_model else []
    else:  # a train config as the adapt job runs it: output_dir and target are the job's, under its state_dir
        out = [("cache_dir", cfg.cache_dir, True), ("source.root", cfg.source.root, False)]
        if cfg.model.pretrained not in ("imagenet", "none"):
            out.append(("model.pretrained", Path(cfg.model.pretrained), False))
    for key, path, _ in out:
        assert path is not None and Path(path).is_absolute(), f"{key}: {path} is not an absolute path"
    return out


def under(path: Path | str, folder: Path | str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def check_paths_reachable(verb: str, cfg, mounts: dict[str, bool], where: str) -> None:
    """Every path the config names lies in a mount (target -> writable); the ones the service writes, writably."""
    for key, path, writes in config_paths(verb, cfg):
        holders = [t for t in mounts if under(path, t)]
        assert holders, f"{where}: {key} {path} is in nothing mounted ({sorted(mounts)})"
        if writes:
            best = max(holders, key=lambda t: len(PurePosixPath(t).parts))
            assert mounts[best], f"{where}: {key} {path} is written, but {best} is mounted read-only"


def validate(verb: str, file: Path, mounts: dict[str, bool], where: str, files: dict[str, Path],
             monkeypatch) -> dict[Path, tuple[str, object]]:
    """Load `file` with `verb`'s loader and check its paths against `mounts`; an adapt config's train config
    (found through `files`: container path -> file here) too. Each file validated -> (verb, config)."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    cfg = LOADERS[verb](file)
    check_paths_reachable(verb, cfg, mounts, where)
    if verb != "adapt":
        return {file: (verb, cfg)}
    train = files.get(str(cfg.train))
    assert train is not None, f"{where}: train {cfg.train} is not a config mounted into the job"
    # as the job reads it: the target, which the file may leave out, is each run's harvest under state_dir
    train_cfg = load_train_config(train, defaults={"target": {"kind": "harvest", "root": cfg.state_dir / "runs"}})
    check_paths_reachable("train", train_cfg, mounts, f"{where} ({cfg.train})")
    assert under(train_cfg.cache_dir, cfg.state_dir), f"{where}: {cfg.train}: cache_dir outside state_dir {cfg.state_dir}"
    return {file: (verb, cfg), train: ("train", train_cfg)}


# --- Dockerfile ----------------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, dict]:
    """Stage name -> {from, instructions: [(KEYWORD, rest)]}; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in {"ARG", "FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD",
                           "HEALTHCHECK", "VOLUME", "LABEL"}, f"{DOCKERFILE}: unknown instruction {keyword}"
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert m, f"{DOCKERFILE}: every stage is named: FROM {rest}"
            current = stages[m[2]] = {"from": m[1], "instructions": []}
        elif current is not None:
            current["instructions"].append((keyword, rest.strip()))
    return stages


def stage_value(stages: dict, name: str, keyword: str):
    """The last KEYWORD of a stage or of the stages it is built on (ENTRYPOINT, CMD, USER inherit)."""
    while name in stages:
        found = [rest for kw, rest in stages[name]["instructions"] if kw == keyword]
        if found:
            return found[-1]
        name = stages[name]["from"]
    return None


def exec_form(rest: str | None, what: str) -> list[str]:
    assert rest is not None, f"{DOCKERFILE}: no {what}"
    value = json.loads(rest)
    assert isinstance(value, list), f"{DOCKERFILE}: {what} in exec form (a JSON list), so signals reach crossview"
    return value


def image_argv(target: str, entrypoint: list[str] | None = None, command: list[str] | None = None) -> list[str]:
    """What a container of the image runs, with a compose/k8s entrypoint or command laid over the image's."""
    stages = dockerfile_stages()
    ep = entrypoint if entrypoint is not None else exec_form(stage_value(stages, target, "ENTRYPOINT"), f"{target} ENTRYPOINT")
    if command is None and entrypoint is None:
        cmd = stage_value(stages, target, "CMD")
        command = exec_form(cmd, f"{target} CMD") if cmd else []
    return [*ep, *(command or [])]


def pip_extras(run: str) -> list[set[str]]:
    """The extras of every crossview install in a RUN line: `pip install "...crossview-*.whl)[edge,cpu]"`."""
    return [set(m[1].split(",")) for m in re.finditer(r"crossview[^\s\"']*\[([a-z0-9_,-]+)\]", run)]


WANTED = {"edge": {"edge", "cpu"}, "matcher": {"matcher", "postgres", "milvus", "cpu"}, "adapt": {"train", "gpu"}}


def test_dockerfile_targets_install_only_their_extras_and_run_as_a_user():
    stages = dockerfile_stages()
    assert set(WANTED) <= set(stages), f"targets: {sorted(stages)}"
    for target, wanted in WANTED.items():
        runs = [rest for kw, rest in stages[target]["instructions"] if kw == "RUN"]
        installs = [e for run in runs for e in pip_extras(run)]
        assert installs == [wanted], f"{target}: installs crossview with extras {installs}, wanted {wanted}"
        for extras in installs:
            assert extras <= set(EXTRAS), f"{target}: extras {extras - set(EXTRAS)} are not in pyproject.toml"
        assert "test" not in set().union(*installs)
        assert stage_value(stages, target, "USER") == "crossview", f"{target}: runs as root"
    assert "nvidia/cuda" in dockerfile_arg("CUDA_IMAGE") and stages["adapt"]["from"] == "${CUDA_IMAGE}"
    # The edge gets torch only as the CPU build, from the CPU index, before ultralytics could pull CUDA wheels.
    edge_runs = [rest for kw, rest in stages["edge"]["instructions"] if kw == "RUN"]
    assert "--index-url ${TORCH_CPU_INDEX}" in edge_runs[0] and "torch==" in edge_runs[0]
    assert dockerfile_arg("TORCH_CPU_INDEX").endswith("/whl/cpu")
    assert not any("torch" in r for r in (rest for kw, rest in stages["matcher"]["instructions"] if kw == "RUN"))
    # The images pin the torch the train extra pins.
    pins = {Requirement(r).name: str(Requirement(r).specifier) for r in EXTRAS["train"]}
    assert pins["torch"] == f"=={dockerfile_arg('TORCH_VERSION')}"
    assert pins["torchvision"] == f"=={dockerfile_arg('TORCHVISION_VERSION')}"


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, f"{DOCKERFILE}: no ARG {name}=..."
    return m[1]


def test_dockerfile_commands_are_real_verbs_and_the_matcher_has_a_healthcheck():
    for target in WANTED:
        commands_of(image_argv(target), f"{DOCKERFILE} target {target}")
    stages = dockerfile_stages()
    health = stage_value(stages, "matcher", "HEALTHCHECK")
    assert health and "/api/v1/health" in health and "CMD" in health
    assert "8080" in " ".join(rest for kw, rest in stages["matcher"]["instructions"] if kw == "EXPOSE")


def test_dockerfile_copies_exist_and_the_dockerignore_lets_them_through():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert "*" in ignore, "the dockerignore is an allow-list"
    for target, stage in dockerfile_stages().items():
        for kw, rest in stage["instructions"]:
            if kw != "COPY" or "--from" in rest:
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"{target}: COPY {src}: not in the checkout"
                assert src.rstrip("/") in allowed, f"{target}: COPY {src} is excluded by Dockerfile.dockerignore"
    for src in ("pyproject.toml", "README.md"):  # the wheel's build reads them
        assert src in allowed


# --- package extras ------------------------------------------------------------------------------------------

HEAVY = {"torch", "torchvision", "triton"}
# ONNX Runtime is one module in two distributions; the dev venv holds the GPU one, the CPU images the other.
FLAVOUR = {"onnxruntime-gpu": "onnxruntime"}


def _dist(name: str) -> str:
    name = name.lower().replace("_", "-")
    return FLAVOUR.get(name, name)


def _requires(name: str) -> list[str]:
    for candidate in [name, *(k for k, v in FLAVOUR.items() if v == name)]:
        try:
            return md.requires(candidate) or []
        except md.PackageNotFoundError:
            continue
    raise AssertionError(f"{name} is not installed: `make install` should have installed it")


def _closure(reqs: list[str]) -> set[str]:
    """Every distribution `reqs` pull in, from the installed metadata (the dev venv holds them all)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = _dist(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in _requires(name)]
    return seen


def _service_requirements(*extras: str) -> list[str]:
    return PYPROJECT["project"]["dependencies"] + [r for e in extras for r in EXTRAS[e]]


def test_extras_split_the_install():
    assert {"edge", "matcher", "train", "test", "cpu", "gpu"} <= set(EXTRAS)
    names = {e: {Requirement(r).name for r in reqs} for e, reqs in EXTRAS.items()}
    base = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert not base & (HEAVY | {"onnxruntime", "onnxruntime-gpu", "pytest", "ruff", "ultralytics", "faiss-cpu"}), base
    assert not (names["edge"] | names["matcher"]) & HEAVY, "the edge and matcher extras name no torch"
    assert names["cpu"] == {"onnxruntime"} and names["gpu"] == {"onnxruntime-gpu"}
    # The matcher image really is free of torch and CUDA.
    matcher = _closure(_service_requirements("matcher", "cpu"))
    assert not matcher & HEAVY and not any(d.startswith("nvidia-") for d in matcher), sorted(matcher)


def test_make_install_still_installs_everything_the_suite_needs():
    make = (REPO / "Makefile").read_text()
    m = re.search(r"^EXTRAS \?= (\S+)$", make, re.M)
    assert m and '-e ".[$(EXTRAS)]"' in make
    extras = set(m[1].split(","))
    assert extras == {"edge", "matcher", "postgres", "milvus", "train", "test", "gpu"}, \
        "every service and backend, the tests, one ONNX Runtime flavour"
    assert "make test" in (REPO / ".ci" / "run").read_text()


# (file, import) pairs that are not the service's own: kernel/runtime.py imports ultralytics only when the edge
# calls it; kernel/config.py imports psycopg only to check a `store.kind: postgres` dsn (the matcher's postgres
# extra); kernel/checkpoint.py (torch) is read by the trainer alone.
NOT_THEIRS = {("kernel/runtime.py", "ultralytics"), ("kernel/config.py", "psycopg")}
SERVICE_FILES = {
    "edge": (["edge", "kernel"], ["kernel/checkpoint.py"], ("edge", "cpu")),
    "matcher": (["matcher", "kernel"], ["kernel/checkpoint.py"], ("matcher", "postgres", "milvus", "cpu")),
    "train": (["trainer", "kernel"], [], ("train", "gpu")),
}


@pytest.mark.parametrize("service", sorted(SERVICE_FILES))
def test_each_service_extra_provides_what_the_service_imports(service):
    folders, skip, extras = SERVICE_FILES[service]
    provided = _closure(_service_requirements(*extras))
    owners = md.packages_distributions()
    files = [f for d in folders for f in sorted((REPO / d).rglob("*.py"))] + [REPO / "crossview" / "cli.py",
                                                                              REPO / "crossview" / "site.py"]
    missing = []
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        if rel in skip:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in ("crossview", "__future__") or (rel, top) in NOT_THEIRS:
                    continue
                dists = {_dist(d) for d in owners.get(top, [])}
                if not dists & provided:
                    missing.append(f"{rel}: {top} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not missing, f"{service}: imports its extras {extras} do not install:\n" + "\n".join(sorted(set(missing)))


NO_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError("torch is not installed in this image: " + name)
    sys.meta_path.insert(0, NoTorch())
    import crossview.cli, crossview.edge.node, crossview.matcher.service, crossview.matcher.api, crossview.kernel.embedder
    from crossview.cli import main
    for verb in ("edge", "matcher", "status"):
        try:
            main([verb, "--help"])
        except SystemExit as e:
            assert e.code == 0, verb
    assert "torch" not in sys.modules
""")


def test_edge_and_matcher_paths_import_without_torch():
    r = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("CROSSVIEW_VENV_CHECK") != "1", reason="set CROSSVIEW_VENV_CHECK=1: a venv install, minutes")
def test_matcher_extras_install_into_a_fresh_venv_without_torch(tmp_path):
    """What the matcher image's install line does, into a venv here: no torch, and the matcher starts."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[matcher,cpu]"], check=True, timeout=1200)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & HEAVY and not any(n.startswith("nvidia-") for n in names) and "pytest" not in names
    subprocess.run([str(venv / "bin" / "crossview"), "matcher", "--help"], check=True, capture_output=True, timeout=120)


# --- docker-compose ------------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _site(path: str, site: Path) -> Path:
    return Path(path.replace("${CROSSVIEW_SITE:-./site}", str(site)))


def compose_mounts(svc: dict) -> dict[str, bool]:
    """Mount target -> writable, for a compose service's volumes, configs, secrets and tmpfs."""
    mounts: dict[str, bool] = {}
    for v in svc.get("volumes", []):
        parts = re.sub(r"\$\{[^}]*\}", "SITE", v).split(":")
        mounts[parts[1]] = not (len(parts) > 2 and "ro" in parts[2].split(","))
    for c in svc.get("configs", []):
        mounts[c["target"]] = False
    for s in svc.get("secrets", []):
        target = s["target"] if isinstance(s, dict) else s
        mounts[target if target.startswith("/") else f"/run/secrets/{target}"] = False
    for t in svc.get("tmpfs", []):
        mounts[t] = True
    return mounts


def compose_services() -> dict[str, dict]:
    services = compose()["services"]
    assert {"matcher", "edge-1", "edge-2", "adapt"} <= set(services)
    return services


def test_compose_commands_are_real_verbs():
    for name, svc in compose_services().items():
        target = svc["build"]["target"]
        assert svc["image"].startswith(f"crossview-{target}:") or (name == "models" and target == "adapt")
        argv = image_argv(target, svc.get("entrypoint"), svc.get("command"))
        commands_of(argv, f"{COMPOSE} service {name}")


def test_compose_configs_validate_and_their_paths_are_mounted(monkeypatch, tmp_path):
    doc = compose()
    files = {name: COMPOSE.parent / c["file"] for name, c in doc["configs"].items()}
    validated = set()
    for name, svc in compose_services().items():
        argv = image_argv(svc["build"]["target"], svc.get("entrypoint"), svc.get("command"))
        by_target = {c["target"]: files[c["source"]] for c in svc.get("configs", [])}
        verb, config = commands_of(argv, name)
        if verb not in LOADERS:
            continue
        assert str(config) in by_target, f"{name}: --config {config} is not a config mounted into the service"
        validated |= validate(verb, by_target[str(config)], compose_mounts(svc), f"{COMPOSE} service {name}",
                              by_target, monkeypatch).keys()
        if verb == "edge":
            assert "CAM_PASS" in svc.get("environment", {}), f"{name}: the camera URLs read ${{CAM_PASS}}"
    assert validated == set(files.values()), f"configs no service loads: {set(files.values()) - validated}"
    assert set((COMPOSE.parent / "config").glob("*.yaml")) == validated


def matcher_reached(verb: str, cfg) -> list[tuple[str, str, Path]]:
    """(key, URL, token file) of each way an edge or the adapt job reaches the matcher's HTTP API; the token is
    the matcher's `http.edge_token_file` for an edge, its `http.token_file` for the adapt job."""
    if verb == "edge":
        return [("embedder.registry", cfg.embedder.registry.url, cfg.embedder.registry.token_file),
                ("harvest.upload", cfg.harvest.upload.url, cfg.harvest.upload.token_file)]
    return [("matcher", cfg.matcher.url, cfg.matcher.token_file)] if verb == "adapt" else []


def compose_loaded(monkeypatch) -> dict[str, tuple[str, list[str], object]]:
    """Service -> (verb, argv, its config loaded, or None for a verb without one)."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    files = {name: COMPOSE.parent / c["file"] for name, c in compose()["configs"].items()}
    out = {}
    for name, svc in compose_services().items():
        argv = image_argv(svc["build"]["target"], svc.get("entrypoint"), svc.get("command"))
        verb, config = commands_of(argv, name)
        by_target = {c["target"]: files[c["source"]] for c in svc.get("configs", [])}
        out[name] = (verb, argv, LOADERS[verb](by_target[str(config)]) if verb in LOADERS else None)
    return out


def model_reads(verb: str, cfg) -> list[tuple[str, Path]]:
    """The ONNX files a service loads at its start."""
    if verb == "edge":
        return [("embedder.model", cfg.embedder.model)]
    if verb == "matcher":
        return [(f"models.{i}", m) for i, m in enumerate(cfg.models)]
    return [("baseline_model", cfg.baseline_model)] if verb == "adapt" and cfg.baseline_model else []


def in_volume(mounts: list[tuple[str, str, str]], path: Path | str, where: str) -> tuple[str, str]:
    """(volume, path inside it) of a container path, through (mount target, volume, sub-path) mounts."""
    holders = [m for m in mounts if under(path, m[0])]
    assert holders, f"{where}: {path} is on no volume"
    target, volume, subpath = max(holders, key=lambda m: len(PurePosixPath(m[0]).parts))
    return volume, str(PurePosixPath(subpath or ".") / PurePosixPath(path).relative_to(target))


def check_setup_writes_every_model(reads: dict[str, list[tuple[str, Path]]], builds: list[tuple[str, Path]],
                                   mounts: dict[str, list[tuple[str, str, str]]]) -> None:
    """Every model a service loads at start is a file a setup step's `build-embedder --out` writes, on the same volume;
    each edge's its own, which only its rollout replaces (so a canary edge runs the version on trial alone)."""
    written = {in_volume(mounts[who], out, who) for who, out in builds}
    for who, models in reads.items():
        for key, path in models:
            assert in_volume(mounts[who], path, who) in written, f"{who}: {key} {path} is written by no setup step"
    edges = [in_volume(mounts[who], path, who) for who, models in reads.items() for key, path in models
             if key == "embedder.model"]
    assert len(edges) >= 2 and len(set(edges)) == len(edges), f"edges share a model file: {edges}"


def test_compose_setup_writes_every_model_a_service_starts_with(monkeypatch):
    services = compose_services()
    mounts = {name: [(v.split(":")[1], v.split(":")[0], "") for v in svc.get("volumes", []) if not v.startswith(("$", ".", "/"))]
              for name, svc in services.items()}
    loaded = compose_loaded(monkeypatch)
    builds = [(name, Path(argv[argv.index("--out") + 1])) for name, (verb, argv, _) in loaded.items() if verb == "build-embedder"]
    assert all(services[name]["profiles"] == ["setup"] for name, _ in builds)
    reads = {name: model_reads(verb, cfg) for name, (verb, _, cfg) in loaded.items() if cfg is not None}
    check_setup_writes_every_model(reads, builds, mounts)


def test_compose_edges_and_the_adapt_job_reach_the_matcher_with_its_tokens(monkeypatch):
    services, loaded = compose_services(), compose_loaded(monkeypatch)

    def secret(name: str, path: Path) -> str:
        return {f"/run/secrets/{s['target']}": s["source"] for s in services[name].get("secrets", [])}[str(path)]

    matcher = loaded["matcher"][2]
    token = {"edge": secret("matcher", matcher.http.edge_token_file), "adapt": secret("matcher", matcher.http.token_file)}
    assert token["edge"] != token["adapt"]
    reached = 0
    for name, (verb, _, cfg) in loaded.items():
        for key, url, token_file in matcher_reached(verb, cfg):
            u = urllib.parse.urlsplit(url)
            assert (u.hostname, u.port) == ("matcher", matcher.http.port), f"{name}: {key}.url {url}: not the matcher"
            assert secret(name, token_file) == token[verb], f"{name}: {key}.token_file is not the matcher's {verb} token"
            reached += 1
    assert reached == 5  # two edges' registry and upload, the adapt job


def test_compose_secrets_are_the_files_crossview_init_writes(tmp_path):
    from crossview.site import init_site, parse_camera

    site = tmp_path / "site"
    init_site(site, ["edge-1", "edge-2"], [parse_camera("gate=rtsp://10.0.0.21/stream")], matcher_host="matcher")
    for name, s in compose()["secrets"].items():
        assert _site(s["file"], site).is_file(), f"secret {name}: {s['file']} is not what `crossview init` writes"
    allow = [v for v in compose_services()["matcher"]["volumes"] if v.endswith(":/etc/crossview/keys/edges:ro")]
    assert allow and _site(allow[0].rsplit(":", 2)[0], site).is_dir()


def test_compose_shape():
    services = compose_services()
    assert "matcher-data" in compose()["volumes"]
    assert any(v.startswith("matcher-data:/var/lib/crossview/matcher") for v in services["matcher"]["volumes"])
    assert "/api/v1/health" in " ".join(services["matcher"]["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in services["matcher"]["ports"] if p.endswith(":8080"))
    assert services["adapt"]["profiles"] == ["adapt"]
    gpu = services["adapt"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    for name in ("edge-1", "edge-2"):
        assert services[name]["depends_on"]["matcher"]["condition"] == "service_healthy"
    for name, svc in services.items():
        assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], f"{name}: not hardened"


# --- Kubernetes ----------------------------------------------------------------------------------------------

def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted(K8S.rglob("*.yaml")):
        if f.parent.name == "config" or f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            assert isinstance(d, dict), f"{f}: a YAML document that is not a mapping"
            docs.append({**d, "_file": f})
    return docs


def pod_specs() -> list[tuple[str, dict]]:
    out = []
    for d in k8s_docs():
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind in ("Deployment", "StatefulSet", "Job"):
            spec = dict(d["spec"]["template"]["spec"])
            claims = [{"name": t["metadata"]["name"], "persistentVolumeClaim": {}} for t in d["spec"].get("volumeClaimTemplates", [])]
            spec["volumes"] = [*spec.get("volumes", []), *claims]
            out.append((f"{kind}/{name}", spec))
        elif kind == "CronJob":
            out.append((f"{kind}/{name}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def generated_configmaps() -> dict[str, dict[str, Path]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for gen in kust["configMapGenerator"]:
        files = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
            files[key] = K8S / path
        out[gen["name"]] = files
    return out


def test_k8s_manifests_parse_and_kustomization_lists_them():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for r in kust["resources"]:
        assert (K8S / r).is_file(), f"kustomization.yaml: {r} is missing"
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"StatefulSet", "Deployment", "CronJob", "Service", "PersistentVolumeClaim", "Secret"} <= kinds
    for d in k8s_docs():
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{d['_file']}: apiVersion, metadata.name"


def secret_files(vol: dict, templates: dict[str, dict]) -> set[str]:
    """The file names a Secret volume shows: its keys, or the paths of the `items` it projects."""
    secret = vol["secret"]
    held = templates[secret["secretName"]]
    items = secret.get("items")
    for item in items or []:
        assert item["key"] in held, f"{secret['secretName']}: no key {item['key']} in secrets.example.yaml"
    return {i["path"] for i in items} if items else set(held)


def test_k8s_commands_are_real_verbs_and_configs_validate(monkeypatch):
    maps = generated_configmaps()
    templates = {d["metadata"]["name"]: d.get("stringData") or d.get("data") for d in k8s_docs()
                 if d["_file"].name == "secrets.example.yaml"}
    validated = set()
    for where, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            argv = [*c.get("command", []), *c.get("args", [])]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in templates[ref["name"]], f"{where}: {ref} not in secrets.example.yaml"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts: dict[str, bool] = {}
            sources: dict[str, dict] = {}
            files: dict[str, Path] = {}  # config file in the container -> its file here
            for m in c["volumeMounts"]:
                vol = volumes[m["name"]]
                ro = m.get("readOnly", False) or "configMap" in vol or "secret" in vol or \
                    vol.get("persistentVolumeClaim", {}).get("readOnly", False)
                mounts[m["mountPath"]], sources[m["mountPath"]] = not ro, vol
                name = (vol.get("secret") or {}).get("secretName") or (vol.get("configMap") or {}).get("name")
                if name:  # every Secret/ConfigMap a pod mounts is generated or templated
                    assert name in maps or name in templates, f"{where}: {name} is neither generated nor in secrets.example.yaml"
                if name in maps:
                    files |= {f"{m['mountPath']}/{key}": file for key, file in maps[name].items()}
            verb, config = commands_of(argv, f"{where} container {c['name']}")
            if verb not in LOADERS:
                continue
            assert str(config) in files, f"{where}: --config {config}: no generated ConfigMap mounted there"
            loaded = validate(verb, files[str(config)], mounts, where, files, monkeypatch)
            validated |= loaded.keys()
            for what, cfg in loaded.values():
                for key, path, _ in config_paths(what, cfg):  # a key file: its Secret template holds it
                    vol = sources.get(str(PurePosixPath(path).parent)) or {}
                    if "secret" in vol:
                        assert PurePosixPath(path).name in secret_files(vol, templates), \
                            f"{where}: {key} {path}: not a file of Secret {vol['secret']['secretName']}"
    assert validated == {f for files in maps.values() for f in files.values()} == set((K8S / "config").glob("*.yaml"))


def test_k8s_edges_and_the_adapt_job_reach_the_matcher_service(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}
    maps = generated_configmaps()
    matcher = load_matcher_config(maps["crossview-matcher-config"]["matcher.yaml"])
    (container,) = docs[("StatefulSet", "crossview-matcher")]["spec"]["template"]["spec"]["containers"]
    http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert http == matcher.http.port
    service = {p["port"]: p["targetPort"] for p in docs[("Service", "crossview-matcher")]["spec"]["ports"]}
    reached = 0
    for verb, cm, key in [("edge", "crossview-edge-1-config", "edge.yaml"), ("edge", "crossview-edge-2-config", "edge.yaml"),
                          ("adapt", "crossview-adapt-config", "adapt.yaml")]:
        for what, url, _ in matcher_reached(verb, LOADERS[verb](maps[cm][key])):
            u = urllib.parse.urlsplit(url)
            assert u.hostname == "crossview-matcher" and service.get(u.port) == "http", f"{cm}: {what}.url {url}"
            reached += 1
    assert reached == 5


def test_k8s_setup_job_writes_every_model_a_pod_starts_with(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    maps = generated_configmaps()
    reads, builds, mounts = {}, [], {}
    for where, spec in pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            who = f"{where} container {c['name']}"
            mounts[who] = [(m["mountPath"], volumes[m["name"]]["persistentVolumeClaim"]["claimName"], m.get("subPath", ""))
                           for m in c["volumeMounts"] if "claimName" in volumes[m["name"]].get("persistentVolumeClaim", {})]
            files = {f"{m['mountPath']}/{key}": file for m in c["volumeMounts"]
                     for key, file in maps.get((volumes[m["name"]].get("configMap") or {}).get("name"), {}).items()}
            argv = [*c.get("command", []), *c.get("args", [])]
            verb, config = commands_of(argv, who)
            if verb == "build-embedder":
                builds.append((who, Path(argv[argv.index("--out") + 1])))
            elif verb in LOADERS:
                reads[who] = model_reads(verb, LOADERS[verb](files[str(config)]))
    assert len(builds) == 3 and all(who.startswith("Job/crossview-build-embedder") for who, _ in builds)
    check_setup_writes_every_model(reads, builds, mounts)


def test_k8s_matcher_adapt_and_edges_shape():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}
    sts = docs[("StatefulSet", "crossview-matcher")]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/api/v1/health", probe
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/v1/ready"  # out of the Service while its store is down
    assert ("Service", "crossview-matcher") in docs
    cron = docs[("CronJob", "crossview-adapt")]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    res = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == 1 == res["limits"]["nvidia.com/gpu"]
    edges = [d for (kind, _), d in docs.items() if kind == "Deployment"]
    assert len(edges) >= 2 and all(d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate" for d in edges)
    assert all("crossview/camera-group" in d["metadata"]["labels"] for d in edges)
    for d in k8s_docs():  # templates only: placeholders, never key material
        for value in (d.get("stringData") or {}).values():
            assert value.startswith("<") and value.endswith(">"), f"{d['_file']}: a real value in a template?"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_base():
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    names = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    assert all(any(n.startswith(g + "-") for n in names) for g in generated_configmaps()), names
    assert all(d["metadata"].get("namespace") == "crossview" for d in rendered if d["kind"] != "Namespace")


# --- systemd -------------------------------------------------------------------------------------------------

def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file: section -> key -> values (keys may repeat); a line that is no `key=value` fails."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path}:{n}: not a key=value line in a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNITS = ["crossview-edge@.service", "crossview-matcher.service", "crossview-adapt.service"]


def _sysusers() -> set[str]:
    return {ln.split()[1] for ln in (SYSTEMD / "sysusers.d" / "crossview.conf").read_text().splitlines()
            if ln.startswith("u ")}


def _tmpfiles() -> set[str]:
    return {ln.split()[1] for ln in (SYSTEMD / "tmpfiles.d" / "crossview.conf").read_text().splitlines()
            if ln.startswith("d ")}


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_run_real_verbs_with_configs_that_validate(name, monkeypatch):
    u = unit(SYSTEMD / name)
    svc = u["Service"]
    instance = "edge-1" if "@" in name else ""
    assert svc["User"] == ["crossview"] and "crossview" in _sysusers()
    made = _tmpfiles() | {f"/var/lib/{d.replace('%i', instance)}" for v in svc.get("StateDirectory", []) for d in v.split()}
    writable = {p.replace("%i", instance) for v in svc.get("ReadWritePaths", []) for p in v.split()}
    readable = {p.replace("%i", instance).lstrip("-") for v in svc.get("ReadOnlyPaths", []) for p in v.split()}
    writable |= {f"/var/lib/{d.replace('%i', instance)}" for v in svc.get("StateDirectory", []) for d in v.split()}
    assert svc["ProtectSystem"] == ["strict"] and svc["NoNewPrivileges"] == ["yes"]
    for d in writable | readable | {svc["WorkingDirectory"][0]}:
        assert any(under(d, m) for m in made) or d in made, f"{name}: {d} is made by neither tmpfiles.d nor StateDirectory="
    (exec_start,) = svc["ExecStart"]
    argv = [a.replace("%i", instance) for a in shlex.split(exec_start)]
    mounts = {**{p: True for p in writable}, **{p: False for p in readable}}
    verb, config = commands_of(argv, name)
    assert verb in LOADERS and under(config, "/etc/crossview"), f"{name}: --config {config} outside /etc/crossview"
    files = {f"/{p.relative_to(SYSTEMD).as_posix()}": p for p in (SYSTEMD / "etc").rglob("*.yaml")}
    assert str(config) in files, f"{name}: {config}: deploy/systemd{config} does not exist"
    validate(verb, files[str(config)], mounts, name, files, monkeypatch)
    if "adapt" in name:
        assert svc["Type"] == ["oneshot"]


def test_systemd_timer_and_every_example_config_is_used():
    timer = unit(SYSTEMD / "crossview-adapt.timer")
    assert timer["Timer"]["Unit"] == ["crossview-adapt.service"] and timer["Timer"]["Persistent"] == ["true"]
    assert (SYSTEMD / timer["Timer"]["Unit"][0]).is_file() and timer["Timer"]["OnCalendar"]
    configs = {p.relative_to(SYSTEMD / "etc").as_posix() for p in (SYSTEMD / "etc").rglob("*.yaml")}
    named = {"crossview/matcher.yaml", "crossview/edges/edge-1.yaml", "crossview/adapt/adapt.yaml",
             "crossview/adapt/train.yaml"}
    assert configs == named


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify():
    """systemd's own parser: unknown keys or bad values are reported. The binaries are not installed here."""
    units = [str(SYSTEMD / u) for u in [*UNITS, "crossview-adapt.timer"]]
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "is not executable: No such file or directory" not in ln]
    assert not problems, "\n".join(problems)


# --- deploy/README.md ----------------------------------------------------------------------------------------

def test_readme_commands_are_real_verbs():
    """Every `crossview ...` line in deploy/README.md's shell blocks parses (placeholders in <> become text)."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    found = 0
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                words = shlex.split(part.strip().removeprefix("sudo -u crossview "))
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words and PurePosixPath(words[0]).name == "crossview":
                    parse_cli(words[1:], f"deploy/README.md: {part.strip()}")
                    found += 1
    assert found >= 8, f"only {found} crossview commands in deploy/README.md"
