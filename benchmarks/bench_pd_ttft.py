"""Time to first token: prefill alone against prefill + layer-streamed KV transfer to a TPLA decode server.

    python benchmarks/bench_pd_ttft.py [--lengths 256,1024,4096,8192] [--repeats 3]
                                       [--device cuda --decode-tp 1]

Real servers over HTTP on this machine: a plain server (prefill only: max_new_tokens 1), and a PD pair
(prefill T=1; decode T=2, g=2) behind our router, where the decode answers with the prefill's first token
once every layer's KV has reached both of its ranks (max_new_tokens 1: no decode step is timed). Dummy weights with
DeepSeek-V2-Lite's latent shapes (kv_lora_rank 512, rope 64), 8 dense layers and narrow heads, so the
transfer is real-sized while CPU prefill stays affordable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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



def first_token_seconds(url: str, ids: list[int]) -> float:
    """Seconds until the answer with the first (and only) token: max_new_tokens 1 ends the request there."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
    start = time.perf_counter()
    r = httpx.post(url + "/generate", json=body, timeout=600)
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
            first_token_seconds(url, [rng.randrange(2, 4096) for _ in range(64)])
        rows = []
        load_before = os.getloadavg()[0]
        for n in (int(x) for x in args.lengths.split(",")):
            alone, pd = [], []
            for _ in range(args.repeats):
                ids = [rng.randrange(2, 4096) for _ in range(n)]
                time.sleep(args.pause_s)
                alone.append(first_token_seconds(plain_url, ids))
                time.sleep(args.pause_s)
                pd.append(first_token_seconds(router_url, ids))
            a, p = sorted(alone)[len(alone) // 2], sorted(pd)[len(pd) // 2]
            kv_mb = n * 8 * (512 + 64) * 4 / 1e6
            rows.append((n, a, p, kv_mb))
            print(f"{n:>6} tokens: prefill alone {a * 1e3:9.1f} ms, PD {p * 1e3:9.1f} ms ({p / a:.2f}x), "
                  f"{kv_mb:.1f} MB of KV", flush=True)
    finally:
        stop_servers(procs)
    table = "| prompt tokens | KV streamed (MB) | TTFT prefill alone (ms) | TTFT prefill + transfer (ms) | ratio |\n|---|---|---|---|---|\n"
    table += "\n".join(f"| {n} | {mb:.1f} | {a * 1e3:.1f} | {p * 1e3:.1f} | {p / a:.2f}x |" for n, a, p, mb in rows)
    body = (f"Dummy DeepSeek-V2-Lite latent shapes with `{json.dumps(OVERRIDE)}`, fp32; medians of "
            f"{args.repeats}, on {args.device}. PD: prefill T=1 -> decode T={tp}, g={tp} over loopback TCP "
            "(authenticated: every message tagged with the cluster secret), through tpla_router, TTFT = the "
            "decode's answer carrying the first token (prefill + layer-streamed KV transfer + handshake).\n\n"
            + table
            + f"\n\n1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.")
    print(write_result(args.name, "Time to first token: prefill alone vs prefill + KV transfer", body))


if __name__ == "__main__":
    main()
