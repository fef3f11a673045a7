"""``python -m linear_moe.pipelines``: help, argument validation, submit against local stand-ins."""
import http.server
import socket
import subprocess
import sys
import threading

import pytest

from linear_moe.pipelines import cli, submit
from linear_moe.pipelines import pipeline as pl


def test_help_lists_the_three_commands():
    out = subprocess.run([sys.executable, "-m", "linear_moe.pipelines", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("compile", "run-local", "submit"):
        assert command in out.stdout


def test_every_pipeline_parameter_is_a_flag():
    args = cli.parser().parse_args(["run-local"])
    assert cli._arguments(args) == pl.DEFAULTS
    args = cli.parser().parse_args(["submit", "--host", "http://x", "--tensor-parallel", "2", "--use-trainjob",
                                    "--cpu-per-node", "32", "--memory-per-node", "400Gi"])
    assert cli._arguments(args) == {**pl.DEFAULTS, "tensor_parallel": 2, "use_trainjob": True, "cpu_per_node": "32",
                                    "memory_per_node": "400Gi"}


@pytest.mark.parametrize("command", [["compile"], ["run-local"], ["submit", "--host", "http://x"]])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: True)" not in text
    if command != ["run-local"]:
        assert "disable KFP caching of every step (default: caching on)" in text
    if command[0] == "submit":
        assert text.count("default: KFP's") == 1 and text.count("the client's own auth") == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_submit_unreachable_host_is_a_clear_error(monkeypatch, capsys, valid_mixer):
    host = f"http://127.0.0.1:{_closed_port()}"
    code = cli.main(["submit", "--host", host, "--lsm-mixer", valid_mixer])
    assert code == 2
    err = capsys.readouterr().err
    assert host in err and "unreachable" in err


@pytest.mark.parametrize("argv,match", [
    (["--preset", "huge"], "unknown preset"),
    (["--layer-pattern", "LLQ"], "unknown symbol 'Q'"),
    (["--tensor-parallel", "3", "--nodes", "1", "--gpus-per-node", "8", "--use-trainjob"], "is not divisible by"),
    (["--expert-parallel", "16", "--nodes", "1", "--gpus-per-node", "8", "--use-trainjob"],
     "expert_parallel=16 must divide"),
    (["--model-overrides", "{hidden_size: 8"], "is not valid JSON"),
    (["--model-overrides", '{"hidden_sise": 8}'], "hidden_sise"),
    (["--cpu-per-node", "abc"], "cpu_per_node 'abc' is not a positive Kubernetes quantity"),
    (["--memory-per-node", "16GB"], "memory_per_node '16GB'"),
], ids=["preset", "pattern", "tp", "ep", "json", "field", "cpu", "memory"])
def test_submit_rejects_bad_parameters_before_contacting_the_host(capsys, valid_mixer, argv, match):
    host = f"http://127.0.0.1:{_closed_port()}"  # never reached: validation comes first
    assert cli.main(["submit", "--host", host, "--lsm-mixer", valid_mixer, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "unreachable" not in err


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)  # an auth-protected KFP answers, which counts as reachable
        self.end_headers()

    def log_message(self, *args):
        pass


def test_submit_creates_a_run_and_returns_its_url(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    calls = {}

    class FakeClient:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def create_run_from_pipeline_package(self, path, **kwargs):
            calls["run"] = (path, kwargs)
            return type("Result", (), {"run_id": "run-123"})()

    host = f"http://127.0.0.1:{server.server_port}/pipeline"
    try:
        package = tmp_path / "p.yaml"
        package.write_text("{}")
        url = submit.submit(str(package), host, {"steps": 5}, namespace="team-a", experiment="exp", token="tok",
                            client_factory=FakeClient)
    finally:
        server.shutdown()
    assert url == f"{host}/#/runs/details/run-123"
    assert calls["init"] == {"host": host, "existing_token": "tok", "namespace": "team-a"}
    path, kwargs = calls["run"]
    assert path == str(package) and kwargs["arguments"] == {"steps": 5} and kwargs["experiment_name"] == "exp"
    assert kwargs["service_account"] == "linear-moe-launcher"


def test_run_local_rejects_parallel_sizes_for_one_process(capsys, valid_mixer, tmp_path):
    """run-local trains in one process: any model-parallel size > 1 fails before a step runs."""
    root = tmp_path / "root"
    assert cli.main(["run-local", "--pipeline-root", str(root), "--lsm-mixer", valid_mixer,
                     "--tensor-parallel", "2"]) == 2
    assert "tensor_parallel=2: without --use-trainjob the train step runs in the pipeline pod" in capsys.readouterr().err
    assert not root.exists()


def test_nodes_do_not_make_room_for_parallel_sizes_without_a_trainjob(capsys, valid_mixer, tmp_path):
    """--nodes sizes the TrainJob only: in-pod training stays one process, so TP=2 fails up front."""
    root = tmp_path / "root"
    assert cli.main(["run-local", "--pipeline-root", str(root), "--lsm-mixer", valid_mixer, "--tensor-parallel", "2",
                     "--nodes", "2"]) == 2
    assert "without --use-trainjob the train step runs in the pipeline pod as one process" in capsys.readouterr().err
    assert not root.exists()
    arguments = cli._arguments(cli.parser().parse_args(["submit", "--host", "http://x", "--lsm-mixer", valid_mixer,
                                                        "--tensor-parallel", "2", "--nodes", "2", "--use-trainjob"]))
    cli.validate_arguments(arguments)  # two TrainJob processes: TP=2 fits


def test_train_config_errors_come_before_the_pipeline_runs(capsys, valid_mixer, tmp_path):
    """The train step's own TrainConfig checks run up front: here the packed-batch refusal of the
    sequence-wise balance loss (the pipeline trains with reset_at_eod and micro-batches of 4)."""
    root = tmp_path / "root"
    assert cli.main(["run-local", "--pipeline-root", str(root), "--lsm-mixer", valid_mixer,
                     "--model-overrides", '{"moe_aux_loss_type": "seq_aux_loss"}']) == 2
    assert "TrainConfig.reset_at_eod: runs each micro-batch as one packed sequence" in capsys.readouterr().err
    assert not root.exists()


def test_compile_command_writes_the_ir(tmp_path):
    import yaml

    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "-o", str(out), "--train-gpus", "1", "--no-cache"]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    resources = spec["deploymentSpec"]["executors"]["exec-train-component"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "1"
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in spec["root"]["dag"]["tasks"].values())


def test_submit_refuses_train_pod_gpus_with_a_trainjob(capsys, valid_mixer):
    host = f"http://127.0.0.1:{_closed_port()}"
    assert cli.main(["submit", "--host", host, "--lsm-mixer", valid_mixer, "--train-gpus", "1", "--use-trainjob"]) == 2
    err = capsys.readouterr().err
    assert "--train-gpus 1 asks GPUs for the train pod" in err and "unreachable" not in err
