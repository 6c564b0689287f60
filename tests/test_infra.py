"""Static checks of the deployment files (ray_cluster.yaml, infra/*): they parse, Ray's own validator accepts the
cluster config, and every script, command-line option, import path and Ray version they name exists here.

Commands are found in code blocks, `inline code` and YAML comments (backslash continuations joined):
  python [/home/ray/x2l/]jobs/X.py --opt ...   the script exists; each --opt is in its --help; its parse_args accepts it
  ray <command> ... --opt ... [-- ...]          the command and options exist in Ray's click CLI
  hf download ... --opt                         each --opt is in `hf download --help`
  a span holding only options, `--opt ...`      options of jobs/index_corpus.py (the README's prose uses them)
Each `--help` runs once per module (cached). No cloud, docker or kubectl is needed.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
RAYJOB = ROOT / "infra" / "rayjob.yaml"
RAYSERVICE = ROOT / "infra" / "rayservice.yaml"
README = ROOT / "infra" / "README.md"
IMAGE_REPO = "/home/ray/x2l/"  # where infra/Dockerfile puts the repo (checked below)
IMAGE_HOME = "/home/ray"  # $HOME of user `ray` in rayproject/ray images: what `~` means on cluster nodes
INDEX_SCRIPT = "jobs/index_corpus.py"
SERVE_IMPORT_PATH = "x2l.serve:app"
SERVE_ARGS = {
    "store",
    "model",
    "num_gpus",
    "max_batch_size",
    "batch_wait_timeout_s",
    "h_budget_bytes",
    "l_cache_bytes",
    "top_k",
    "autoscaling_config",
    "route_by_video",
    "max_videos_per_replica",
}
RAY_VERSION = importlib.metadata.version("ray")

OPT = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SCRIPT = re.compile(r"python3?\s+(?:" + re.escape(IMAGE_REPO) + r")?(jobs/[\w/.-]+\.py)(.*)")
IMPORT_PATH = re.compile(r"\bx2l(?:\.\w+)+:\w+")


# --- helpers ------------------------------------------------------------------------------------------------------


@functools.cache
def help_options(*cmd: str) -> frozenset[str]:
    """Options listed by `cmd --help` (run once per command)."""
    out = subprocess.run([*cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{cmd} --help failed: {out.stderr[-2000:]}"
    return frozenset(OPT.findall(out.stdout))


def script_options(script: str) -> frozenset[str]:
    assert (ROOT / script).is_file(), f"{script} does not exist"
    return help_options(sys.executable, str(ROOT / script))


@functools.cache
def script_module(script: str):
    spec = importlib.util.spec_from_file_location(f"_infra_{Path(script).stem}", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_script_args(script: str, argv: list[str], where: str):
    """The script's own argparse on argv: unknown options, bad types or choices, missing required ones fail."""
    mod = script_module(script)
    assert hasattr(mod, "parse_args"), f"{script} has no parse_args(argv)"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return mod.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: {script} refuses {argv}: {err.getvalue().strip()}")


@functools.cache
def ray_cli():
    from ray.scripts.scripts import cli

    return cli


def command_units(text: str, markdown: bool) -> list[str]:
    """Logical lines (YAML/Dockerfile comments or Markdown code blocks) and inline-code spans of `text`."""
    text = re.sub(r"\\\n[#\s]*", " ", text)  # join `\` continuations (also across `#` comment lines)
    if not markdown:
        return [ln.lstrip("# ").strip() for ln in text.splitlines()]
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return [ln.strip() for b in blocks for ln in b.splitlines()] + spans


def check_command(unit: str, where: str, prose: bool = False) -> list[str]:
    """Checks one command unit (see the module docstring); returns what it checked, for coverage asserts. Only in
    Markdown (prose=True) is a unit of bare options taken as options of jobs/index_corpus.py."""
    checked = []
    unit = re.sub(r"^\$\s+", "", unit.split("  #")[0].strip())
    for m in SCRIPT.finditer(unit):
        script, rest = m.group(1), m.group(2)
        missing = set(OPT.findall(rest)) - script_options(script)
        assert not missing, f"{where}: {script} has no option(s) {sorted(missing)}: {unit}"
        if "--help" not in rest.split():
            parse_script_args(script, shlex.split(rest), where)
        checked.append(script)
    head = unit.split(" -- ")[0]
    if head.startswith("ray "):
        tokens = shlex.split(head)
        cmd, path = ray_cli(), ["ray"]
        for tok in tokens[1:]:
            if not hasattr(cmd, "commands") or tok.startswith("-"):
                break
            assert tok in cmd.commands, f"{where}: `{' '.join(path)} {tok}` is no Ray CLI command: {unit}"
            cmd = cmd.commands[tok]
            path.append(tok)
        assert not hasattr(cmd, "commands"), f"{where}: `{' '.join(path)}` needs a subcommand: {unit}"
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        missing = {t.split("=")[0] for t in tokens if t.startswith("--")} - known
        assert not missing, f"{where}: `{' '.join(path)}` has no option(s) {sorted(missing)}: {unit}"
        checked.append(" ".join(path))
    if unit.startswith("hf download "):
        missing = set(OPT.findall(unit)) - help_options(str(Path(sys.executable).parent / "hf"), "download")
        assert not missing, f"{where}: `hf download` has no option(s) {sorted(missing)}"
        checked.append("hf download")
    if prose and unit.startswith("--"):
        missing = set(OPT.findall(unit)) - script_options(INDEX_SCRIPT)
        assert not missing, f"{where}: {INDEX_SCRIPT} has no option(s) {sorted(missing)}: {unit}"
        checked.append("options")
    return checked


def check_import_path(path: str, where: str) -> None:
    """module:attr -> the module's file exists and defines attr at top level (parsed, not imported)."""
    assert re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", path), f"{where}: bad import path {path!r}"
    module, attr = path.split(":")
    file = ROOT / (module.replace(".", "/") + ".py")
    assert file.is_file(), f"{where}: {path}: {file.relative_to(ROOT)} does not exist"
    names = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {
        t.id
        for n in ast.parse(file.read_text()).body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert attr in names, f"{where}: {path}: {file.relative_to(ROOT)} defines no top-level {attr}"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def ray_containers(spec: dict) -> tuple[dict, list[dict]]:
    """(head container, [worker container per group]) -- the first container of each pod template is Ray's."""
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    return head, [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def all_images(spec: dict) -> set[str]:
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return {c["image"] for p in pods for c in p.get("containers", []) + p.get("initContainers", [])}


def check_model_visible(spec: dict, model: str, where: str) -> None:
    """`model` lies under a volume mounted in the head and every worker, and each pod's init container fetches it."""
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"].rstrip("/") + "/" for m in pod["containers"][0].get("volumeMounts", [])]
        assert any(model.startswith(m) for m in mounts), f"{where}: model {model} is on no volume of {mounts}"
        fetch = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in pod.get("initContainers", []))
        assert model in fetch, f"{where}: no init container writes {model}"
        for unit in [" ".join(c.get("command", []) + c.get("args", [])) for c in pod.get("initContainers", [])]:
            check_command(unit, where)


def check_secret_env(container: dict, where: str) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in env, f"{where}: {container['name']} lacks {name}"
        ref = env[name].get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") and ref.get("key"), f"{where}: {name} must come from a Secret (valueFrom.secretKeyRef)"
    literal = [n for n, e in env.items() if n.startswith("AWS_") and "value" in e]
    assert not literal, f"{where}: literal credentials in env: {literal}"


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


# --- ray_cluster.yaml ---------------------------------------------------------------------------------------------


def test_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it talks to AWS: merge the AWS defaults, then check against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(load(CLUSTER))))


def test_cluster_cpu_head_spot_gpu_workers_and_ray_version():
    cfg = load(CLUSTER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0 and head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert workers, "no GPU worker node type"
    for w in workers:
        assert w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 1 <= w["max_workers"] <= cfg["max_workers"]
    image = cfg["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", image), image
    assert ("FROM", image) in dockerfile(), "ray_cluster.yaml and infra/Dockerfile use different base images"


def test_cluster_setup_installs_cuda_torch_then_x2l_from_file_mounts():
    cfg = load(CLUSTER)
    cmds = cfg["setup_commands"]
    assert not any(
        "torchvision" in c for c in cmds + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    )
    torch_i = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\btorch\b(?![\w.-])", c)]
    assert torch_i, "setup_commands do not install torch"
    # The CUDA build comes from the default index: no CPU wheel index, no pinned +cpu build.
    assert not re.search(r"index-url|whl/cpu|\+cpu", cmds[torch_i[0]]), cmds[torch_i[0]]
    x2l_i = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*(-e )?~/x2l\b", c)]
    assert x2l_i and torch_i[0] < x2l_i[0], "torch must be installed before x2l (pip install [-e] ~/x2l)"
    # ~/x2l is assembled from file_mounts whose local sides exist here and hold what pip install needs.
    mounts = cfg["file_mounts"]
    for remote, local in mounts.items():
        assert remote.startswith("~/x2l/") and (ROOT / local).exists(), (remote, local)
        assert Path(remote).name == Path(local).name, (remote, local)
    assert {Path(r).name for r in mounts} >= {"pyproject.toml", "README.md", "x2l", "jobs"}


def test_cluster_commands_name_existing_scripts_and_options():
    cfg = load(CLUSTER)
    starts = [part for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] for part in c.split(";")]
    units = command_units(CLUSTER.read_text(), markdown=False) + cfg["setup_commands"] + starts
    checked = [c for u in units for c in check_command(u, "ray_cluster.yaml")]
    assert {INDEX_SCRIPT, "ray up", "ray dashboard", "ray job submit", "ray down", "hf download", "ray start"} <= set(
        checked
    ), checked
    # The documented job: --model is where setup_commands put the checkpoint; GPUs suffice for --concurrency.
    fetched = {m.replace("~", IMAGE_HOME) for c in cfg["setup_commands"] for m in re.findall(r"--local-dir\s+(\S+)", c)}
    gpu_slots = sum(
        t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in cfg["available_node_types"].values()
    )
    for u in units:
        if m := SCRIPT.search(u):
            ns = parse_script_args(m.group(1), shlex.split(m.group(2)), "ray_cluster.yaml")
            assert ns.model in fetched, f"--model {ns.model} is not downloaded by setup_commands ({fetched})"
            assert ns.concurrency * ns.num_gpus_per_actor <= gpu_slots


# --- infra/Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_base_copies_repo_and_installs_torch_and_x2l():
    instr = dockerfile()
    froms = [a for i, a in instr if i == "FROM"]
    assert len(froms) == 1 and re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-gpu", froms[0]), froms
    workdir = [a for i, a in instr if i == "WORKDIR"][-1]
    assert workdir.rstrip("/") + "/" == IMAGE_REPO
    copied = set()
    for i, a in instr:
        if i == "COPY":
            *src, dst = [t for t in a.split() if not t.startswith("--")]
            for s in src:
                assert (ROOT / s).exists(), f"COPY of missing {s}"
                copied.add(s.rstrip("/"))
            assert dst.startswith("./") or dst.startswith(IMAGE_REPO), dst
    assert copied >= {"pyproject.toml", "README.md", "x2l", "jobs"}, copied
    pips = [seg for i, a in instr if i == "RUN" for seg in re.split(r"&&|;", a) if "pip install" in seg]
    torch_i = [k for k, s in enumerate(pips) if re.search(r"\btorch\b(?![\w.-])", s)]
    x2l_i = [k for k, s in enumerate(pips) if re.search(r"pip install\b.*\s(-e\s+)?\.(\s|$)", s)]
    assert torch_i and x2l_i and torch_i[0] < x2l_i[0], pips
    assert not any(re.search(r"torchvision|index-url|whl/cpu|\+cpu", s) for s in pips), pips
    assert not [a for i, a in instr if i in ("ENV", "ARG") and re.search(r"AWS_|SECRET|TOKEN|PASSWORD", a, re.I)]


# --- infra/rayjob.yaml --------------------------------------------------------------------------------------------


def test_rayjob_runs_index_job_on_gpu_workers_with_secret_credentials():
    doc = load(RAYJOB)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) >= 0
    entry = spec["entrypoint"]
    m = SCRIPT.fullmatch(entry.strip())
    assert m and entry.split()[1].startswith(IMAGE_REPO), f"entrypoint must run {IMAGE_REPO}jobs/...: {entry}"
    assert check_command(entry, "rayjob entrypoint") == [m.group(1)]
    ns = parse_script_args(m.group(1), shlex.split(m.group(2)), "rayjob entrypoint")
    assert ns.store.startswith("s3://") and ns.num_gpus_per_actor == 1
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == RAY_VERSION
    head, workers = ray_containers(cluster)
    assert gpus(head) == 0 and all(gpus(w) >= 1 for w in workers)
    total_gpus = sum(g["replicas"] * gpus(w) for g, w in zip(cluster["workerGroupSpecs"], workers, strict=True))
    assert ns.concurrency * ns.num_gpus_per_actor <= total_gpus, "--concurrency exceeds the GPU workers"
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert isinstance(g["rayStartParams"], dict)
    for c in (head, *workers):
        check_secret_env(c, "rayjob")
    check_model_visible(cluster, ns.model, "rayjob")


# --- infra/rayservice.yaml ----------------------------------------------------------------------------------------


def test_rayservice_deploys_serve_app_with_documented_args():
    doc = load(RAYSERVICE)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    check_import_path(app["import_path"], "rayservice")
    from x2l.serve import ServeArgs

    cfg = ServeArgs.model_validate(app["args"])  # unknown or mistyped args fail here
    args = app["args"]
    assert {"store", "model"} <= set(args) <= SERVE_ARGS, sorted(args)
    serve_src = (ROOT / "x2l" / "serve.py").read_text()
    readme = README.read_text()
    for key in args:
        assert re.search(rf"\b{key}\b", serve_src), f"x2l/serve.py does not know arg {key}"
        assert f"`{key}`" in readme, f"infra/README.md does not document Serve arg {key}"
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == RAY_VERSION
    head, workers = ray_containers(cluster)
    assert gpus(head) == 0 and workers and all(gpus(w) >= max(1, float(args.get("num_gpus", 0))) for w in workers)
    for c in (head, *workers):
        check_secret_env(c, "rayservice")
    check_model_visible(cluster, args["model"], "rayservice")
    # Issue 16: a multi-replica query tier sharded by video, sized by Serve's autoscaler, on GPU pods that follow it.
    assert cfg.route_by_video and cfg.max_videos_per_replica >= 1
    scaling = cfg.replicas["autoscaling_config"]
    assert 2 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
    assert cfg.max_ongoing_requests >= scaling["target_ongoing_requests"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_pods = [g for g in cluster["workerGroupSpecs"] if gpus(g["template"]["spec"]["containers"][0]) > 0]
    per_pod = [gpus(g["template"]["spec"]["containers"][0]) // max(1, int(cfg.num_gpus)) for g in gpu_pods]
    assert sum(g["minReplicas"] * n for g, n in zip(gpu_pods, per_pod, strict=True)) >= scaling["min_replicas"]
    assert sum(g["maxReplicas"] * n for g, n in zip(gpu_pods, per_pod, strict=True)) >= scaling["max_replicas"]


# --- across files -------------------------------------------------------------------------------------------------


def test_kuberay_images_are_the_documented_build():
    images = all_images(cluster_spec(load(RAYJOB))) | all_images(cluster_spec(load(RAYSERVICE)))
    assert len(images) == 1, f"RayJob and RayService should run one image: {images}"
    (image,) = images
    readme = README.read_text()
    assert f"-f infra/Dockerfile -t {image} ." in readme and f"docker push {image}" in readme


def test_readme_commands_scripts_options_and_import_paths_exist():
    text = README.read_text()
    checked = [c for u in command_units(text, markdown=True) for c in check_command(u, "infra/README.md", True)]
    assert {INDEX_SCRIPT, "ray up", "ray dashboard", "ray job submit", "ray job logs", "ray down", "options"} <= set(
        checked
    ), checked
    paths = set(IMPORT_PATH.findall(text))
    assert SERVE_IMPORT_PATH in paths
    for p in paths:
        check_import_path(p, "infra/README.md")
    # Every option the deployment files pass to a script is explained here too.
    used = set(OPT.findall(SCRIPT.search(load(RAYJOB)["spec"]["entrypoint"]).group(2)))
    for u in command_units(CLUSTER.read_text(), markdown=False):
        if m := SCRIPT.search(u):
            used |= set(OPT.findall(m.group(2)))
    assert used and not [o for o in used if o not in text], sorted(o for o in used if o not in text)


def test_serve_config_for_serve_deploy_builds_the_app_config():
    """infra/serve_config.yaml: every arg is one ServeArgs takes (with its type), and each is documented."""
    from x2l.serve import ServeArgs

    doc = yaml.safe_load((ROOT / "infra" / "serve_config.yaml").read_text())
    [app] = doc["applications"]
    assert app["import_path"] == "x2l.serve:app"
    check_import_path(app["import_path"], "serve_config")
    cfg = ServeArgs.model_validate(app["args"])
    assert cfg.max_ongoing_requests >= cfg.max_batch_size
    assert cfg.replicas == {"num_replicas": cfg.num_replicas} and cfg.num_replicas >= 2 and cfg.route_by_video
    readme = README.read_text()
    for key in app["args"]:
        assert f"`{key}`" in readme, f"infra/README.md does not document Serve arg {key}"
