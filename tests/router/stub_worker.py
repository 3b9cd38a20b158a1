"""A stand-in prefill or decode server speaking SGLang's HTTP API, for router tests and benchmarks.

It answers at once (or as configured), records every generation body it receives, and exposes
control endpoints under /stub/: POST /stub/config (merge behaviour), GET /stub/requests,
GET /stub/aborts, POST /stub/release (let held requests answer), POST /stub/reset.

A request shape the toy model cannot serve gets a 400, as a real server's validation would give.
Its toy tokenizer maps each character to its code point; a prefill stub reports prompt logprobs
[-(k+1)/1000, token, None] for position k, a decode stub reports `decode_logprobs` (default []).

Run: python stub_worker.py --role prefill|decode [--port N]; prints {"port": N} once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

DEFAULTS: dict[str, Any] = {
    "health": 200,  # status of /health and /health_generate
    "status": 200,  # status of generation routes
    "delay": 0.0,  # seconds before a reply, or before each streamed chunk
    "chunks": 3,  # streamed events per item
    "hold": False,  # wait for /stub/release (or an abort) before answering
    "drop": False,  # close the connection instead of answering
    "break_after": None,  # streaming: close the connection after this many chunks
    "pause_after": None,  # streaming: after this many chunks, wait for /stub/release (or an abort)
    "decode_logprobs": [],  # decode role: its own input_token_logprobs
    # KV transfer failed (the decode's contract): 503 {"error": {"type": "kv_transfer_failed"}}, or when
    # streaming, that error as the only event before [DONE]
    "kv_fail": False,
    "abort_empty": False,  # /generate answers 200 with finish_reason abort and no output (older servers)
    "record": True,  # keep request bodies (benchmarks turn this off)
}


class Stub:
    def __init__(self, role: str, port: int) -> None:
        self.role = role
        self.port = port
        self.behaviour = dict(DEFAULTS)
        self.requests: list[dict[str, Any]] = []
        self.aborts: list[dict[str, Any]] = []
        self.flushes = 0
        self.release = asyncio.Event()
        self.aborted: set[str] = set()

    # ---- toy model -------------------------------------------------------------------------

    def _tokens(self, item: Any) -> list[int]:
        if isinstance(item, str):
            return [ord(c) for c in item]
        return list(item) if isinstance(item, list) else []

    def _meta(self, body: dict[str, Any], i: int, prompt: Any, rid: str | None, n_out: int,
              return_logprob: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": rid,
            "prompt_tokens": len(prompt) if isinstance(prompt, (str, list)) else 0,
            "completion_tokens": n_out,
            "finish_reason": {"type": "length", "length": n_out},
            "served_by": f"{self.role}:{self.port}",
            "bootstrap_room": _item(body.get("bootstrap_room"), i),
        }
        if return_logprob:
            if self.role == "prefill":
                meta["input_token_logprobs"] = [[-(k + 1) / 1000, t, None] for k, t in enumerate(self._tokens(prompt))]
            else:
                meta["input_token_logprobs"] = list(self.behaviour["decode_logprobs"])
        return meta

    # ---- plumbing --------------------------------------------------------------------------

    async def _gate(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
        """Record, then apply hold / drop / status; a response here replaces the normal answer."""
        if self.behaviour["record"]:
            self.requests.append({"path": request.path, "body": body, "t": time.time(),
                                  "authorization": request.headers.get("Authorization")})
        if self.behaviour["hold"]:
            await self._wait_release(_rids(body))
        if self.behaviour["drop"]:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if self.behaviour["status"] != 200:
            return web.json_response({"error": {"message": f"stub {self.role} failing on purpose"}},
                                     status=self.behaviour["status"])
        if self.behaviour["kv_fail"]:
            error = {"message": f"KV transfer for room {body.get('bootstrap_room')} failed (stub)",
                     "type": "kv_transfer_failed"}
            if not body.get("stream"):
                return web.json_response({"error": error}, status=503)
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(b"data: " + json.dumps({"error": {**error, "code": 503}}).encode() + b"\n\n")
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        return None

    async def _wait_release(self, rids: list[str]) -> None:
        while not self.release.is_set() and not self.aborted.intersection(rids):
            await asyncio.sleep(0.01)

    async def _stream(self, request: web.Request, events: AsyncIterator[bytes],
                      rids: list[str]) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        sent = 0
        async for event in events:
            if self.behaviour["break_after"] is not None and sent >= self.behaviour["break_after"]:
                assert request.transport is not None
                request.transport.close()
                return out
            await out.write(event)
            sent += 1
            if sent == self.behaviour["pause_after"]:
                await self._wait_release(rids)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _ticks(self, rids: list[str]) -> AsyncIterator[int]:
        for step in range(self.behaviour["chunks"]):
            if self.behaviour["delay"]:
                await asyncio.sleep(self.behaviour["delay"])
            if self.aborted.intersection(rids):
                return
            yield step

    # ---- SGLang native API -----------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._served(request, self._generate)

    async def _served(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, RecursionError) as e:
            return web.json_response({"error": {"message": f"stub cannot parse this body: {e!r}"}}, status=400)
        gated = await self._gate(request, body)
        if gated is not None:
            return gated
        try:
            return await handler(request, body)
        except (TypeError, IndexError, KeyError, AttributeError, ValueError) as e:
            return web.json_response({"error": {"message": f"stub cannot serve this request: {e!r}"}}, status=400)

    async def _generate(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        text = body.get("text")
        ids = body.get("input_ids")
        batch = isinstance(text, list) or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))
        prompts = (text if isinstance(text, list) else ids) if batch else [text if text is not None else ids]
        rids = _rids(body)
        rl = body.get("return_logprob")
        n = self.behaviour["chunks"]

        def item(i: int, upto: int) -> dict[str, Any]:
            flag = bool(_item(rl, i))
            if self.behaviour["abort_empty"]:
                meta = self._meta(body, i, prompts[i], _rid(rids, i), 0, flag)
                meta["finish_reason"] = {"type": "abort", "message": "KV transfer failed (stub)"}
                return {"text": "", "output_ids": [], "meta_info": meta}
            return {"text": "".join(f" {self.role}{k}" for k in range(upto)),
                    "meta_info": self._meta(body, i, prompts[i], _rid(rids, i), upto, flag)}

        for i in range(len(prompts)):  # shape errors surface here, before any streamed byte
            item(i, 0)
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                async for step in self._ticks(rids):
                    for i in range(len(prompts)):
                        payload = item(i, step + 1)
                        if batch:
                            payload["index"] = i
                        yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            return await self._stream(request, events(), rids)
        if self.behaviour["delay"]:
            await asyncio.sleep(self.behaviour["delay"])
        out = [item(i, n) for i in range(len(prompts))]
        return web.json_response(out if batch else out[0])

    # ---- OpenAI API ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._served(request, lambda r, b: self._openai(r, b, chat=False))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._served(request, lambda r, b: self._openai(r, b, chat=True))

    async def _openai(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        rids = _rids(body)
        rid = rids[0] if rids else "none"
        prompt = body.get("prompt")
        n_items = len(prompt) if not chat and isinstance(prompt, list) and prompt \
            and isinstance(prompt[0], (str, list)) else 1
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                async for step in self._ticks(rids):
                    for i in range(n_items):
                        piece = f" {self.role}{step}"
                        choice: dict[str, Any] = {"index": i, "finish_reason": None}
                        choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                        chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "model": "stub-model",
                                 "choices": [choice]}
                        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            return await self._stream(request, events(), rids)
        if self.behaviour["delay"]:
            await asyncio.sleep(self.behaviour["delay"])
        text = "".join(f" {self.role}{k}" for k in range(self.behaviour["chunks"]))
        choices = []
        for i in range(n_items):
            choice = {"index": i, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        return web.json_response({
            "id": rid, "object": kind, "model": "stub-model", "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": self.behaviour["chunks"]},
            "bootstrap_room": body.get("bootstrap_room"), "served_by": f"{self.role}:{self.port}",
        })

    # ---- info, health, admin ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.behaviour["health"])

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "stub-model", "tokenizer_path": "stub-model",
                                  "is_generation": True})

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"role": self.role, "port": self.port, "disaggregation_mode": self.role})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    async def model_card(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != "stub-model":
            return web.json_response({"error": {"message": "no such model", "type": "invalid_request_error",
                                                "param": "model", "code": "model_not_found"}}, status=404)
        return web.json_response({"id": "stub-model", "object": "model"})

    async def concate_and_append(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    async def flush_cache(self, request: web.Request) -> web.Response:
        self.flushes += 1
        return web.Response(text="Cache flushed.")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.aborts.append(body)
        self.aborted.add(str(body.get("rid")))
        return web.Response()

    async def get_load(self, request: web.Request) -> web.Response:
        return web.json_response({"load": 0})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f"stub_requests_total {len(self.requests)}\n")

    # ---- control ---------------------------------------------------------------------------

    async def set_config(self, request: web.Request) -> web.Response:
        update = await request.json()
        unknown = set(update) - set(DEFAULTS)
        if unknown:
            return web.json_response({"error": {"message": f"unknown stub settings {sorted(unknown)}"}}, status=400)
        self.behaviour.update(update)
        if "hold" in update or "pause_after" in update:
            self.release.clear()
        return web.json_response(self.behaviour)

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def get_aborts(self, request: web.Request) -> web.Response:
        return web.json_response({"aborts": self.aborts, "flushes": self.flushes})

    async def do_release(self, request: web.Request) -> web.Response:
        self.release.set()
        return web.Response()

    async def reset(self, request: web.Request) -> web.Response:
        self.behaviour = dict(DEFAULTS)
        self.requests.clear()
        self.aborts.clear()
        self.aborted.clear()
        self.flushes = 0
        self.release.clear()
        return web.Response()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model_card)
        r.add_post("/concate_and_append_request", self.concate_and_append)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/abort_request", self.abort_request)
        r.add_get("/get_load", self.get_load)
        r.add_get("/metrics", self.metrics)
        r.add_post("/stub/config", self.set_config)
        r.add_get("/stub/requests", self.get_requests)
        r.add_get("/stub/aborts", self.get_aborts)
        r.add_post("/stub/release", self.do_release)
        r.add_post("/stub/reset", self.reset)
        return app


def _item(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, list) else value


def _rid(rids: list[str], i: int) -> str | None:
    if not rids:
        return None
    return rids[i] if i < len(rids) else rids[0]


def _rids(body: dict[str, Any]) -> list[str]:
    rid = body.get("rid")
    if rid is None:
        return []
    return [str(r) for r in rid] if isinstance(rid, list) else [str(rid)]


async def _serve(role: str, host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    stub = Stub(role, sock.getsockname()[1])
    runner = web.AppRunner(stub.app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(json.dumps({"port": stub.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.role, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
