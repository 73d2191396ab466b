"""Serving benchmarks: a bounded load test and a bounded schema fuzz, both against a real server on loopback.

    run_serve_benchmark(clients=8, seconds=10)   # requests/s, latency percentiles, errors, peak RSS
    run_serve_scaling(clients=(1, 8, 32))        # the same for each client count, and the scaling targets
    run_fuzz(max_examples=25, seconds=60)        # schemathesis against /openapi.json; 5xx responses must be 0

The load runs `emu2 serve` in a child process, as a user would (a random `tiny-chat` saved for the run unless
given a model directory), so the clients' own Python work does not share the server's GIL; given an already
loaded pipeline, it serves that from this process (uvicorn on a thread). The fuzzer serves in this process. Both
send traffic only to 127.0.0.1 and stop by themselves: every loop is bounded in request count and in time.
"""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from PIL import Image

from ..pipelines.emu2 import Emu2Pipeline
from .app import ServerThread, create_app
from .limits import ServeLimits


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _memory_mb(pid: int | str = "self") -> dict:
    """Resident memory of a process (Linux /proc): now (VmRSS) and its peak so far (VmHWM), in MiB."""
    names, found = {"VmRSS": "now", "VmHWM": "peak"}, {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            field_name, _, value = line.partition(":")
            if field_name in names:
                found[names[field_name]] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return found


def _batching_counters(url: str) -> tuple[int, int] | None:
    """The server's (decode steps, answers advanced) so far, from its /healthz; None for the serial worker."""
    batching = httpx.get(url + "/healthz", timeout=10, trust_env=False).json().get("batching")
    return (batching["decode_steps"], batching["sequence_steps"]) if batching else None


def _png_data_url(side: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _load_chat(model_dir):
    return Emu2Pipeline.from_pretrained(model_dir) if model_dir else Emu2Pipeline.from_preset("tiny-chat")


class _ServedInProcess:
    """``pipeline`` served from this process (uvicorn on a thread): the clients share its interpreter and GIL."""

    where = "this process (uvicorn on a thread)"

    def __init__(self, pipeline, limits: ServeLimits, torch_threads: int | None):
        self.app, self.torch_threads, self.threads_before = create_app(pipeline, limits=limits), torch_threads, None
        self.thread = ServerThread(self.app)

    def __enter__(self):
        self.threads_before = torch.get_num_threads()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.thread.__enter__()
        self.url = self.thread.url
        return self

    def __exit__(self, *exc) -> None:
        self.thread.__exit__(*exc)
        torch.set_num_threads(self.threads_before)

    def memory_mb(self) -> dict:
        return _memory_mb()


class _ServedByChild:
    """`emu2 serve --model DIR` in a child process on a free loopback port, as a user runs it: the clients' own
    Python work (this process) does not hold the server's GIL, so the load measures the server alone."""

    where = "a child process (emu2 serve)"

    def __init__(self, model_dir: str | Path, limits: ServeLimits, torch_threads: int | None):
        self.model_dir, self.limits, self.torch_threads = str(model_dir), limits, torch_threads

    def __enter__(self):
        with socket.socket() as probe:  # a free port; the child binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "emu2.cli", "serve", "--model", self.model_dir, "--port", str(port),
                   "--log-level", "warning",
                   *(["--torch-threads", str(self.torch_threads)] if self.torch_threads else [])]
        for name in ("max_queue", "max_tokens", "timeout", "max_batch_size"):
            command += [ServeLimits.flag(name), str(getattr(self.limits, name))]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self._log_tail()
                self.__exit__(None, None, None)
                raise ChildProcessError(f"`{' '.join(command)}` did not start serving:\n{log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def memory_mb(self) -> dict:
        return _memory_mb(self.process.pid)


@contextmanager
def _served(model_dir, pipeline, limits: ServeLimits, torch_threads: int | None):
    """A running chat server for the load: ``pipeline`` in this process, else ``model_dir`` (default: a random
    `tiny-chat` saved for the run) in a child `emu2 serve`."""
    if pipeline is not None:
        with _ServedInProcess(pipeline, limits, torch_threads) as server:
            yield server
        return
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            _load_chat(None).save_pretrained(tmp)
        with _ServedByChild(model_dir or tmp, limits, torch_threads) as server:
            yield server


def _limits(clients: int, seconds: float, max_tokens: int, max_batch_size: int | None) -> ServeLimits:
    batching = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    return ServeLimits(max_queue=max(clients, 1), max_tokens=max(max_tokens, 1), timeout=max(60.0, 2 * seconds),
                       **batching)


def run_serve_benchmark(clients: int = 8, seconds: float = 10.0, max_tokens: int = 8, with_image: bool = True,
                        stream: bool = False, model_dir: str | Path | None = None,
                        max_requests: int = 100_000, pipeline=None, torch_threads: int | None = None,
                        max_batch_size: int | None = None) -> dict:
    """``clients`` concurrent clients posting chat completions for ``seconds`` (at most ``max_requests`` in all).

    The server is `emu2 serve --model model_dir` in a child process (a random `tiny-chat` when no directory is
    given), or ``pipeline`` (an already loaded `Emu2Pipeline`) served from this process, where the clients' Python
    work shares the server's GIL. Returns requests/s, completion tokens/s, latency percentiles (ms), error count
    (any non-200), the batching factor (mean answers per decode step; 1 for the serial worker), the latency of
    /healthz probes made during the load (the event loop must stay responsive while the model computes), and the
    server's memory (RSS, MiB). ``max_batch_size``: the server's (default: `ServeLimits`'; 1 decodes one request
    at a time). ``torch_threads``: the server's intra-op threads (default: torch's); on a CPU shared with other
    work, 1 can be many times faster than spinning threads that wait for cores.
    """
    limits = _limits(clients, seconds, max_tokens, max_batch_size)
    with _served(model_dir, pipeline, limits, torch_threads) as server:
        return _load(server, clients, seconds, max_tokens, with_image, stream, max_requests, limits) | {
            "model": str(model_dir) if model_dir else "tiny-chat (random)", "torch_threads": torch_threads}


@dataclass
class _Tally:
    """What the clients of one load saw, shared between their threads under ``lock``."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)
    tokens: int = 0
    requests: int = 0  # every answer, 200 or not
    health: list = field(default_factory=list)  # /healthz latencies during the load
    peak_rss: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status, used: int, seconds: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.requests += 1
            self.tokens += used
            if status == 200:
                self.latencies.append(seconds)


def _client(url: str, body: dict, tally: _Tally, end: float, max_requests: int, timeout: float) -> None:
    """One client: post ``body`` back to back until ``end`` or ``max_requests`` in all."""
    with httpx.Client(trust_env=False, timeout=timeout) as http:
        while time.monotonic() < end and tally.requests < max_requests:
            t0 = time.monotonic()
            try:
                reply = http.post(url, json=body)
                status = reply.status_code
                used = reply.json().get("usage", {}).get("completion_tokens", 0) if (
                    status == 200 and not body["stream"]) else 0
            except httpx.HTTPError:
                status, used = "connection_error", 0
            tally.record(status, used, time.monotonic() - t0)


def _monitor(server, tally: _Tally, stop: threading.Event) -> None:
    """Every 50 ms: the server's memory, and how long /healthz takes to answer while the model computes."""
    with httpx.Client(trust_env=False, timeout=10) as http:
        while not stop.wait(0.05):
            tally.peak_rss = max(tally.peak_rss, server.memory_mb().get("now", 0.0))
            t0 = time.monotonic()
            try:
                http.get(server.url + "/healthz").raise_for_status()
                tally.health.append(time.monotonic() - t0)
            except httpx.HTTPError:
                pass


def _load(server, clients, seconds, max_tokens, with_image, stream, max_requests, limits) -> dict:
    """One timed load of ``clients`` threads against a running ``server`` (`_served`)."""
    content = [{"type": "text", "text": "What is in the image?"}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": _png_data_url()}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}
    url = server.url + "/v1/chat/completions"
    with httpx.Client(trust_env=False, timeout=limits.timeout) as warm:
        warm.post(url, json=body).raise_for_status()  # first call pays one-off costs
    tally, stop = _Tally(), threading.Event()
    before, steps_before = server.memory_mb().get("now"), _batching_counters(server.url)
    started = time.monotonic()
    threads = [threading.Thread(target=_client, args=(url, body, tally, started + seconds, max_requests,
                                                      limits.timeout), daemon=True) for _ in range(clients)]
    watcher = threading.Thread(target=_monitor, args=(server, tally, stop), daemon=True)
    for t in [watcher, *threads]:
        t.start()
    for t in threads:
        t.join(timeout=seconds + limits.timeout + 5)
    elapsed = time.monotonic() - started
    stop.set()
    watcher.join(timeout=5)
    factor, steps_after = 1.0, _batching_counters(server.url)
    if steps_before is not None and steps_after is not None:
        steps = steps_after[0] - steps_before[0]
        factor = round((steps_after[1] - steps_before[1]) / steps, 2) if steps else None

    ok, ms = tally.statuses.get(200, 0), lambda v: None if v is None else round(1000 * v, 1)
    return {
        "benchmark": "serve", "server": server.where, "clients": clients, "seconds": round(elapsed, 2),
        "max_tokens": max_tokens, "with_image": with_image, "stream": stream,
        "max_batch_size": limits.max_batch_size, "batching_factor": factor, "requests": tally.requests, "ok": ok,
        "errors": tally.requests - ok, "status_counts": {str(k): v for k, v in tally.statuses.items()},
        "requests_per_s": round(ok / elapsed, 2),
        "completion_tokens_per_s": round(tally.tokens / elapsed, 1) if not stream else None,
        "latency_ms": {"p50": ms(_percentile(tally.latencies, 50)), "p99": ms(_percentile(tally.latencies, 99)),
                       "max": ms(max(tally.latencies, default=None))},
        "healthz_under_load_ms": {"probes": len(tally.health), "p50": ms(_percentile(tally.health, 50)),
                                  "p99": ms(_percentile(tally.health, 99))},
        "server_rss_mb": {"before_load": before and round(before, 1), "peak_sampled": round(tally.peak_rss, 1),
                          "peak_process": round(server.memory_mb().get("peak", 0.0), 1)},
    }


def run_serve_scaling(clients=(1, 8, 32), seconds: float = 10.0, max_tokens: int = 8,
                      model_dir: str | Path | None = None, pipeline=None, torch_threads: int | None = 1,
                      max_batch_size: int | None = None) -> dict:
    """One load per client count against one server (as `run_serve_benchmark`), in one run, checked against the
    scaling targets: 8 clients reach >= 4x the requests/s of 1 client, with p99 latency <= 3x the 1-client p50."""
    limits = _limits(max(clients), seconds, max_tokens, max_batch_size)
    with _served(model_dir, pipeline, limits, torch_threads) as server:
        runs = [_load(server, n, seconds, max_tokens, True, False, 100_000, limits) for n in clients]
    table = [{key: run[key] for key in ("clients", "requests_per_s", "completion_tokens_per_s", "batching_factor",
                                        "errors")} | {"p50_ms": run["latency_ms"]["p50"],
                                                      "p99_ms": run["latency_ms"]["p99"]} for run in runs]
    by_clients = {row["clients"]: row for row in table}
    targets = {}
    if 1 in by_clients and 8 in by_clients and by_clients[1]["requests_per_s"] and by_clients[1]["p50_ms"]:
        one, eight = by_clients[1], by_clients[8]
        speedup = eight["requests_per_s"] / one["requests_per_s"]
        latency = (eight["p99_ms"] or float("inf")) / one["p50_ms"]
        targets = {"requests_per_s_8_over_1": round(speedup, 2), "speedup_target_4x_met": speedup >= 4,
                   "p99_8_over_p50_1": round(latency, 2), "latency_target_3x_met": latency <= 3}
    return {"benchmark": "serve-scaling", "model": str(model_dir) if model_dir else "tiny-chat (random)",
            "server": server.where, "torch_threads": torch_threads, "table": table, "targets": targets,
            "runs": runs}


def run_fuzz(max_examples: int = 25, seconds: float = 60.0, model_dir: str | Path | None = None,
             gen_model_dir: str | Path | None = None, seed: int = 0, chat_pipeline=None,
             gen_pipeline=None) -> dict:
    """Schemathesis against the served OpenAPI schema: ``max_examples`` generated requests per operation and
    generation mode (valid and invalid bodies), stopping early after ``seconds``.

    Counts responses by status; ``server_errors`` (5xx) must be 0, and every 4xx must be an OpenAI-style JSON
    error (``malformed_errors`` counts those that are not). Each 5xx comes back with the request that caused it.
    ``chat_pipeline`` / ``gen_pipeline``: already loaded pipelines to serve instead of loading or building them.
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    from ..pipelines.gen import Emu2GenPipeline

    chat = chat_pipeline or _load_chat(model_dir)
    gen = gen_pipeline or (Emu2GenPipeline.from_pretrained(gen_model_dir) if gen_model_dir
                           else Emu2GenPipeline.from_preset("tiny"))
    # Tight limits keep every valid request cheap, so the fuzzer spends its time on breadth.
    limits = ServeLimits(max_images=2, max_image_pixels=256 * 256, max_image_bytes=100_000,
                         max_request_bytes=1_000_000, max_prompt_tokens=256, max_tokens=4, default_max_tokens=4,
                         max_n=2, max_num_beams=2, max_inference_steps=2, max_output_side=32, max_queue=4,
                         timeout=30)
    tally = _FuzzTally(deadline=time.monotonic() + seconds)
    session = requests.Session()
    session.trust_env = False  # loopback only: never through a proxy from the environment

    with ServerThread(create_app(chat, gen, limits=limits)) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=10)
        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                test = given(case=operation.as_strategy(generation_mode=mode))(
                    tally.test_for(operation.label, server.url, session))
                test = settings(max_examples=max_examples, deadline=None, database=None,
                                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                                report_multiple_bugs=False)(test)
                try:
                    hypothesis_seed(seed)(test)()
                except Unsatisfiable:  # e.g. no invalid request exists for a GET without parameters
                    tally.skipped.append(f"{operation.label} {mode.value}")
        healthy = requests.get(server.url + "/healthz", timeout=10).status_code == 200

    statuses = tally.statuses
    return {
        "benchmark": "fuzz", "operations": len(operations), "max_examples_per_operation_and_mode": max_examples,
        "requests": tally.requests, "seconds_budget": seconds, "timed_out": time.monotonic() > tally.deadline,
        "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "by_operation": dict(sorted(tally.per_operation.items())),
        "server_errors": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "connection_errors": statuses.get("connection_error", 0), "malformed_errors": len(tally.malformed),
        "server_alive_after": healthy, "modes_without_cases": tally.skipped, "failures": tally.failures[:20],
        "malformed": tally.malformed[:20], "seed": seed,
    }


@dataclass
class _FuzzTally:
    """What the fuzzer saw: statuses, 5xx failures with their requests, 4xx bodies not in OpenAI's shape."""

    deadline: float
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    malformed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def test_for(self, label: str, base_url: str, session):
        """The hypothesis test body for one operation: send the case, tally the response."""

        def test(case) -> None:
            self.send(case, label, base_url, session)

        return test

    def send(self, case, label: str, base_url: str, session) -> None:
        import requests

        if time.monotonic() > self.deadline:
            return
        try:
            response = case.call(base_url=base_url, session=session, timeout=30)
        except requests.RequestException as error:
            self.statuses["connection_error"] += 1
            self.failures.append({"operation": label, "error": repr(error)[:300]})
            return
        status = response.status_code
        self.requests += 1
        self.statuses[status] += 1
        self.per_operation[f"{label} {status}"] += 1
        if status >= 500:
            self.failures.append({"operation": label, "status": status, "response": response.text[:300],
                                  "request": case.as_curl_command()[:600]})
        elif status >= 400 and not _is_openai_error(response):
            self.malformed.append({"operation": label, "status": status, "response": response.text[:200]})


def _is_openai_error(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)
