"""Time to first token: prefill alone against prefill + layer-streamed KV transfer to a TPLA decode server.

    python benchmarks/bench_pd_ttft.py [--lengths 256,1024,4096,8192] [--repeats 3]
                                       [--device cuda --decode-tp 1]

Real servers over HTTP on this machine: a plain server (prefill only: max_new_tokens 1), and a PD pair
(prefill T=1; decode T=2, g=2) behind our router, where the decode answers with the prefill's first token
once every layer's KV has reached both of its ranks (max_new_tokens 1: no decode step is timed). Dummy weights with
DeepSeek-V2-Lite's latent shapes (kv_lora_rank 512, rope 64), 8 dense layers and narrow heads, so the
transfer is real-sized while CPU prefill stays affordable.

Where a PD request's time goes comes from the servers' own /metrics, read before and after each request
(one request in flight at a time, so each histogram's sum grows by that request's value): the prefill's
arrival-to-answer, the decode's arrival-to-first-token (its KV complete) and first-KV-message-to-DONE, and the
decode's arrival-to-answer; what the client waits beyond that is the router and HTTP (against the HTTP alone:
what the client waits beyond the plain server's arrival-to-answer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launch_server, stop_servers, write_result  # noqa: E402

from tpla_serve.models.registry import builtin_config  # noqa: E402
from tpla_serve.net import free_port

SECRET = "the PD TTFT benchmark's cluster secret"
OVERRIDE = {"num_hidden_layers": 8, "first_k_dense_replace": 8, "hidden_size": 1024, "num_attention_heads": 2, "num_key_value_heads": 2,
            "intermediate_size": 1024, "vocab_size": 4096, "max_position_embeddings": 16384}



# Per-request values, as metric name -> the server's sum that grows by it.
E2E = "tpla_serve_e2e_request_latency_seconds_sum"
TTFT = "tpla_serve_time_to_first_token_seconds_sum"
KV_SECONDS = "tpla_serve_kv_transfer_seconds_total"


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """The unlabelled samples of a server's /metrics."""
    text = client.get(url + "/metrics", timeout=30).text
    samples = (line.split() for line in text.splitlines() if line and not line.startswith("#") and "{" not in line)
    return {fields[0]: float(fields[1]) for fields in samples if len(fields) == 2}


def first_token_seconds(client: httpx.Client, url: str, ids: list[int]) -> float:
    """Seconds until the answer with the first (and only) token: max_new_tokens 1 ends the request there.
    The client keeps its connections, as a serving client does (a new one per request adds ~ms to both)."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
    start = time.perf_counter()
    r = client.post(url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    if len(r.json()["output_ids"]) != 1:
        raise RuntimeError(f"expected one token, got {r.text[:300]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="every server's device (one GPU: all share it)")
    parser.add_argument("--decode-tp", type=int, default=2, help="the PD decode server's T (g = T)")
    parser.add_argument("--name", default="pd_ttft", help="results/<name>_<date>.md")
    parser.add_argument("--pause-s", type=float, default=0.5,
                        help="idle time before each request: the other servers' compute threads, which spin a "
                             "while after their work, go to sleep first (0: back to back)")
    args = parser.parse_args()
    model = ["--model-path", str(builtin_config("deepseek-v2-lite")), "--load-format", "dummy",
             "--skip-tokenizer-init", "--json-model-override-args", json.dumps(OVERRIDE), "--dtype", "float32",
             "--chunked-prefill-size", "2048", "--disaggregation-timeout", "600", "--device", args.device,
             "--disaggregation-secret", SECRET]  # the KV stream authenticated, as a cluster runs it
    # Three servers on one machine: on a GPU each takes a fifth of it, on CPU a 1 GiB KV cache per rank.
    model += ["--mem-fraction-static", "0.2"] if args.device.startswith("cuda") else ["--kv-cache-bytes", str(1 << 30)]
    bootstrap = str(free_port())
    procs = []
    client = httpx.Client()
    try:
        plain, plain_url = launch_server("--role", "decode", "--disaggregation-mode", "null", *model)
        procs.append(plain)
        prefill, prefill_url = launch_server("--role", "prefill", *model, "--disaggregation-bootstrap-port", bootstrap)
        procs.append(prefill)
        tp = str(args.decode_tp)
        decode, decode_url = launch_server("--role", "decode", *model, "--tp-size", tp, "--tpla-groups", tp,
                                    "--disaggregation-bootstrap-port", bootstrap)
        procs.append(decode)
        router, router_url = launch_server("--role", "router", "--prefill", prefill_url, bootstrap, "--decode", decode_url,
                                    "--request-timeout-secs", "600")
        procs.append(router)
        rng = random.Random(0)
        for url in (plain_url, router_url):  # warm-up: first-request costs stay out of the numbers
            first_token_seconds(client, url, [rng.randrange(2, 4096) for _ in range(64)])
        rows, parts = [], []
        load_before = os.getloadavg()[0]
        servers = {"plain": plain_url, "prefill": prefill_url, "decode": decode_url}
        for n in (int(x) for x in args.lengths.split(",")):
            alone, pd, split = [], [], []
            for _ in range(args.repeats):
                ids = [rng.randrange(2, 4096) for _ in range(n)]
                time.sleep(args.pause_s)
                plain_before = scrape(client, plain_url)
                alone.append(first_token_seconds(client, plain_url, ids))
                plain_http = alone[-1] - (scrape(client, plain_url).get(E2E, 0.0) - plain_before.get(E2E, 0.0))
                time.sleep(args.pause_s)
                before = {name: scrape(client, url) for name, url in servers.items()}
                pd.append(first_token_seconds(client, router_url, ids))
                time.sleep(0.1)  # the prefill's own answer reaches its front beside the decode's
                after = {name: scrape(client, url) for name, url in servers.items()}
                grew = {(name, key): after[name].get(key, 0.0) - before[name].get(key, 0.0)
                        for name in servers for key in (E2E, TTFT, KV_SECONDS)}
                split.append((pd[-1], grew["prefill", E2E], grew["decode", TTFT], grew["decode", KV_SECONDS],
                              grew["decode", E2E], pd[-1] - grew["decode", E2E], plain_http))
            a, p = statistics.median(alone), statistics.median(pd)
            kv_mb = n * 8 * (512 + 64) * 4 / 1e6
            rows.append((n, a, p, kv_mb))
            parts.append((n, *(statistics.median(s[i] for s in split) for i in range(7))))
            print(f"{n:>6} tokens: prefill alone {a * 1e3:9.1f} ms, PD {p * 1e3:9.1f} ms ({p / a:.2f}x), "
                  f"{kv_mb:.1f} MB of KV; PD split (ms): " + " ".join(f"{x * 1e3:.1f}" for x in parts[-1][1:]),
                  flush=True)
    finally:
        client.close()
        stop_servers(procs)
    table = "| prompt tokens | KV streamed (MB) | TTFT prefill alone (ms) | TTFT prefill + transfer (ms) | ratio |\n|---|---|---|---|---|\n"
    table += "\n".join(f"| {n} | {mb:.1f} | {a * 1e3:.1f} | {p * 1e3:.1f} | {p / a:.3f}x |" for n, a, p, mb in rows)
    split_table = ("| prompt tokens | PD TTFT (client) | prefill: arrival → answer | decode: arrival → KV complete "
                   "| decode: first KV message → DONE | decode: arrival → answer | router + HTTP (client − decode's) "
                   "| alone: HTTP (client − server's) |\n|---|---|---|---|---|---|---|---|\n")
    split_table += "\n".join(f"| {n} | " + " | ".join(f"{x * 1e3:.1f}" for x in cols) + " |" for n, *cols in parts)
    body = (f"Dummy DeepSeek-V2-Lite latent shapes with `{json.dumps(OVERRIDE)}`, fp32; medians of "
            f"{args.repeats}, on {args.device}. PD: prefill T=1 -> decode T={tp}, g={tp} over loopback TCP "
            "(authenticated: every message tagged with the cluster secret), through tpla_router, TTFT = the "
            "decode's answer carrying the first token (prefill + layer-streamed KV transfer + handshake).\n\n"
            + table
            + "\n\nWhere the PD requests' time went, ms (medians per column, from the servers' /metrics; the "
            "prefill and decode servers get the request from the router at about the same time):\n\n"
            + split_table
            + f"\n\n1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.")
    print(write_result(args.name, "Time to first token: prefill alone vs prefill + KV transfer", body))


if __name__ == "__main__":
    main()
