"""The kfp pipeline: compiled IR YAML (task graph, GPU settings, secrets, caching, retries,
stable cache keys; the RayJob runner in tests/test_rayjob.py), submission through kfp.Client to a loopback stand-in of the KFP REST API, the CLI, and a tiny end-to-end local run
whose model repository the real tritonserver loads and serves."""

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import require

from kuberank.errors import KuberankError
from kuberank.pipelines import local
from kuberank.pipelines import pipeline as pl
from kuberank.pipelines.cli import build_parser
from kuberank.pipelines.compile import check_package, compile_pipeline, package_tasks
from kuberank.pipelines.submit import parse_params, submit
from kuberank.store import RELEASE_FILE
from tests.fixtures import interaction_rows, write_jsonl

CHART = Path(__file__).resolve().parents[1] / "charts" / "kuberank"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The cluster (RayJob and in-pod training) and local packages, compiled once."""
    root = tmp_path_factory.mktemp("ir")
    out = {}
    for key, target, settings in (
        ("rayjob", "cluster", pl.ClusterSettings()),
        ("pod", "cluster", pl.ClusterSettings(training="pod")),
        ("local", "local", None),
    ):
        path = root / f"{key}.yaml"
        summary = compile_pipeline(path, target, settings)
        docs = list(yaml.safe_load_all(path.read_text()))
        out[key] = {
            "path": path,
            "summary": summary,
            "spec": docs[0],
            "platform": docs[1] if len(docs) > 1 else None,
        }
    return out


def _k8s(entry, task_key):
    tasks = package_tasks(entry["spec"])
    executors = entry["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return tasks[task_key], executors.get(tasks[task_key]["executor"], {})


def test_task_graph_follows_the_design(compiled):
    spec = compiled["rayjob"]["spec"]
    tasks = package_tasks(spec)
    assert {k.split("#")[0] for k in tasks} == pl.expected_tasks("cluster")
    assert tasks["finetune"]["component"] == "comp-finetune-rayjob-op"
    assert tasks["finetune"]["depends"] == ["data-prep"]
    assert sorted(tasks["evaluate"]["depends"]) == ["data-prep", "finetune"]
    # export -> TensorRT -> index in both branches (compressed or not); publish after the index
    for suffix in ("", "#2"):
        assert tasks["tensorrt" + suffix]["depends"] == ["export"]
    assert tasks["export"]["depends"] == ["compress"]  # the compressed model is served ...
    assert tasks["index"]["depends"] == ["compress", "tensorrt"]  # ... and indexed
    assert tasks["index#2"]["depends"] == ["tensorrt"]  # or the fine-tuned one, uncompressed
    assert tasks["publish"]["depends"] == ["condition-branches-1", "evaluate"]  # after either index
    conditions = {
        t["taskInfo"]["name"]: t.get("triggerPolicy", {}).get("condition")
        for t in spec["root"]["dag"]["tasks"].values()
    }
    assert (
        conditions["deploy-canary"]
        == "inputs.parameter_values['pipelinechannel--deploy_canary'] == true"
    )
    # typed artifacts and demo defaults
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["dataset_spec"]["defaultValue"] == "movielens-100k"
    assert params["compress_model"]["defaultValue"] is True
    assert params["deploy_canary"]["defaultValue"] is False
    outputs = spec["root"]["outputDefinitions"]["artifacts"]
    assert outputs["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outputs["quality_report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["scores"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["prepared"]["artifactType"]["schemaTitle"] == "system.Dataset"


def test_gpu_settings_only_on_gpu_tasks(compiled):
    assert compiled["rayjob"]["summary"]["gpu_tasks"] == ["tensorrt", "tensorrt#2"]
    assert compiled["pod"]["summary"]["gpu_tasks"] == ["finetune", "tensorrt", "tensorrt#2"]
    assert compiled["local"]["summary"]["gpu_tasks"] == []
    task, k8s = _k8s(compiled["pod"], "finetune")
    assert task["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert task["resources"]["accelerator"]["resourceCount"] == "1"
    assert k8s["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    # the RayJob client is a small CPU task: the RayJob's worker group holds the GPUs
    task, k8s = _k8s(compiled["rayjob"], "finetune")
    assert "accelerator" not in task["resources"] and "tolerations" not in k8s
    assert task["resources"]["resourceCpuLimit"] == "1"
    for name in ("data-prep", "evaluate", "compress", "export", "index", "publish"):
        task, k8s = _k8s(compiled["rayjob"], name)
        assert "accelerator" not in task["resources"] and "nodeSelector" not in k8s, name


def test_s3_secret_on_every_cluster_task_and_no_platform_config_locally(compiled):
    for key in package_tasks(compiled["rayjob"]["spec"]):
        _, k8s = _k8s(compiled["rayjob"], key)
        (secret,) = k8s["secretAsEnv"]
        assert secret["secretName"] == "kuberank-s3", key
        assert {e["envVar"] for e in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
    assert compiled["local"]["platform"] is None
    assert "tensorrt" not in compiled["local"]["summary"]["tasks"]


def test_caching_retries_and_stable_cache_keys(compiled, tmp_path):
    summary = compiled["rayjob"]["summary"]
    assert summary["cached_tasks"] == ["compress", "data-prep", "evaluate", "finetune"]
    assert "publish" not in summary["cached_tasks"] and "export" not in summary["cached_tasks"]
    tasks = package_tasks(compiled["rayjob"]["spec"])
    assert tasks["finetune"]["retry"]["maxRetryCount"] == 2
    assert tasks["tensorrt"]["retry"]["backoffDuration"] == "60s"
    assert not tasks["publish"]["retry"]
    # KFP's cache key hashes the component spec and the task's inputs: compiling again (and
    # with other parameter defaults) must not change any component or executor.
    again = tmp_path / "again.yaml"
    compile_pipeline(again, "cluster", pl.ClusterSettings())
    spec2 = yaml.safe_load_all(again.read_text()).__next__()
    spec1 = compiled["rayjob"]["spec"]
    assert spec2["components"] == spec1["components"]
    assert spec2["deploymentSpec"] == spec1["deploymentSpec"]
    assert all(
        e["container"]["image"] == pl.IMAGE for e in spec1["deploymentSpec"]["executors"].values()
    )


def test_check_package_names_what_is_wrong(compiled, tmp_path):
    docs = list(yaml.safe_load_all(compiled["rayjob"]["path"].read_text()))
    broken = copy.deepcopy(docs)
    for executor in broken[0]["deploymentSpec"]["executors"].values():
        executor["container"].get("resources", {}).pop("accelerator", None)
    path = tmp_path / "no-gpu.yaml"
    path.write_text(yaml.safe_dump_all(broken))
    with pytest.raises(
        KuberankError, match=r"GPU on tasks \[\], expected exactly \['tensorrt', 'tensorrt#2'\]"
    ):
        check_package(path, "cluster")
    broken = copy.deepcopy(docs)
    broken[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-publish-op"].pop(
        "secretAsEnv"
    )
    path.write_text(yaml.safe_dump_all(broken))
    with pytest.raises(KuberankError, match="task publish does not get the kuberank-s3 secret"):
        check_package(path, "cluster")
    with pytest.raises(KuberankError, match="--out: .* must end with .yaml"):
        compile_pipeline(tmp_path / "x.json", "local")
    with pytest.raises(KuberankError, match="--target"):
        pl.build_pipeline("laptop")
    with pytest.raises(KuberankError, match="--training"):
        pl.ClusterSettings(training="slurm")


def test_parse_params_types_and_errors():
    known = pl.build_pipeline("local").pipeline_func.__annotations__
    assert parse_params(
        ["workers=4", "compress-model=false", "max_ndcg_drop=0.5", "dataset_spec=a=b"]
    ) == {"workers": 4, "compress_model": False, "max_ndcg_drop": 0.5, "dataset_spec": "a=b"}
    assert known["workers"] is int
    with pytest.raises(KuberankError, match="--param worker: not a pipeline parameter"):
        parse_params(["worker=4"])
    with pytest.raises(KuberankError, match="--param workers: 'four' is not a valid int"):
        parse_params(["workers=four"])
    with pytest.raises(KuberankError, match="--param deploy_canary: 'maybe' is not a boolean"):
        parse_params(["deploy_canary=maybe"])
    with pytest.raises(KuberankError, match="not NAME=VALUE"):
        parse_params(["workers"])


@pytest.fixture
def kfp_api():
    """A loopback stand-in for the KFP v2beta1 REST API that records every request."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            seen.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "auth": self.headers.get("authorization"),
                    "body": body,
                }
            )
            if self.command == "POST" and self.path.startswith("/apis/v2beta1/experiments"):
                out = {"experiment_id": "exp-1", "display_name": body["display_name"]}
            elif self.command == "POST" and self.path.startswith("/apis/v2beta1/runs"):
                out = {"run_id": "run-1", "display_name": body["display_name"]}
            else:
                out = {}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_submit_uploads_the_compiled_pipeline_through_kfp_client(kfp_api, compiled):
    host, seen = kfp_api
    result = submit(
        host,
        package=str(compiled["rayjob"]["path"]),
        arguments={"workers": 4},
        experiment="nightly",
        run_name="run-a",
        token="secret-token",
    )
    assert result["run_id"] == "run-1" and result["run_name"] == "run-a"
    run = next(
        r for r in seen if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")
    )
    assert run["body"]["display_name"] == "run-a" and run["body"]["experiment_id"] == "exp-1"
    assert run["body"]["runtime_config"]["parameters"] == {"workers": 4}
    assert run["body"]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "kuberank"
    assert "platform_spec" in run["body"]["pipeline_spec"]  # kfp-kubernetes settings travel along
    assert all(r["auth"] == "Bearer secret-token" for r in seen)
    experiment = next(r for r in seen if r["method"] == "POST" and "experiments" in r["path"])
    assert experiment["body"]["display_name"] == "nightly"
    with pytest.raises(KuberankError, match="--host: 'localhost:8888' must start with http"):
        submit("localhost:8888")
    with pytest.raises(KuberankError, match="--package: .*nope.yaml: no such file"):
        submit(host, package="nope.yaml")


def test_cli_help_compile_and_errors(tmp_path, capsys):
    parser = build_parser()
    for argv in (
        ["pipeline"],
        ["pipeline", "compile"],
        ["pipeline", "run"],
        ["pipeline", "submit"],
        ["plan"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage:" in capsys.readouterr().out
    args = parser.parse_args(
        ["pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--training", "pod", "--json"]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gpu_tasks"] == ["finetune", "tensorrt", "tensorrt#2"]
    assert (tmp_path / "p.yaml").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "p.yaml"
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "run"])  # --local is required
    assert "--local" in capsys.readouterr().err


def _infer(url: str, texts: list[str]) -> np.ndarray:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    try:
        batch = np.array([[t.encode()] for t in texts], dtype=object)
        text = http.InferInput("TEXT", list(batch.shape), "BYTES")
        text.set_data_from_numpy(batch)
        result = client.infer(
            "query_encoder", [text], outputs=[http.InferRequestedOutput("EMBEDDING")]
        )
        return result.as_numpy("EMBEDDING")
    finally:
        client.close()


@pytest.mark.slow
def test_tiny_pipeline_runs_locally_and_tritonserver_serves_its_model(tmp_path):
    """Every step on the local runner (small interaction log, 1 worker, 1 epoch, compression off
    so the quality gate cannot flake), then the real tritonserver on STORE/triton-local."""
    from kuberank.item_index import load_index
    from kuberank.serving.triton import TritonServer, find_tritonserver

    try:
        find_tritonserver()
        available = True
    except KuberankError:
        available = False
    require(available, "tritonserver not found (install nvidia-pytriton)")
    log = write_jsonl(tmp_path / "log.jsonl", interaction_rows(users=12, per_user=6))
    steps = []
    result = local.run_local(
        tmp_path / "root",
        log_dir=tmp_path / "logs",
        on_step=steps.append,
        dataset_spec=f"interactions:{log}",
        workers=1,
        epochs=1,
        max_minutes=0.0,
        baselines="popularity",
        compress_model=False,
    )
    store = Path(result["model_store"])
    assert store == tmp_path / "root" / "store"
    release = json.loads((store / RELEASE_FILE).read_text())
    assert release == result["release"]
    assert 0.0 <= result["metrics"]["ndcg@10"] <= 1.0
    assert [r["model"] for r in result["quality_rows"]] == ["popularity", "fine-tuned"]
    assert "| popularity |" in Path(result["quality_report_path"]).read_text()
    assert (
        f"# Release {release['version']} -> {store}"
        in Path(result["release_report_path"]).read_text()
    )
    index = load_index(store)
    assert index.meta["embedding_fingerprint"] == release["embedding_fingerprint"]
    assert len(index) == 8
    # one log per step, each step reported with its headline number
    names = [step.name for step in steps]
    assert set(names) == {pl.PREP, pl.FINETUNE, pl.EVALUATE, pl.EXPORT, pl.INDEX, pl.PUBLISH}
    assert names[-1] == pl.PUBLISH and all(step.ok for step in steps)
    assert all("executor_input" in step.log.read_text() for step in steps)
    headlines = {step.name: local.step_headline(step.name, step.outputs) for step in steps}
    assert headlines[pl.INDEX] == "8 items x 384, exact search; edge bundle 8 items"
    assert headlines[pl.EVALUATE].startswith("test nDCG@10 ")
    # a complete store: the edge bundle answers from the indexed items
    from kuberank.components.edge import edge_query

    found = edge_query(store / "edge", "item number 3", k=5)
    assert len(found) == 5 and "3" in [item for item, _ in found]
    assert release["index"]["edge_items"] == 8
    with TritonServer(store / "triton-local") as server:
        assert server.http_url.startswith("127.0.0.1:")
        vectors = _infer(server.http_url, ["item number 3", "item number 5"])
    assert vectors.shape == (2, index.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    # the served encoder ranks the item with the same text first among the indexed items
    best = [index.ids[i] for i in np.argmax(vectors @ index.embeddings.T, axis=1)]
    assert best == ["3", "5"]
