"""Host time per decode step on the CPU: everything the decode loop does besides the model and the sampler.

    python benchmarks/bench_host_step.py --baseline <git rev>

For B in {1, 64, 256} requests x context in {4K, 32K} x TP in {1, 2}, the real engine decodes --steps steps
of requests whose prompt KV is taken as given (prefill skipped). The model is made almost free so that what
remains is the loop's own work: one layer, 64 hidden dims and a 32-wide latent (dummy weights), and the
attention kernel replaced by a no-op (attention is the model's work, not the host's). Per step the script
measures the wall time, the time inside the model's forward and inside the sampler's kernels, and reports

    host = wall - model forward - sampler.

At TP=2 rank 0's forward includes its collectives, and with them the wait for rank 1, whose own host work
(decoding rank 0's step message, laying out its inputs) would hide in that wait: it is timed on its own, on
the same requests' state, and the TP=2 row reports the larger of rank 0's and rank 1's host time. The
broadcast of the sampled tokens to the other ranks is a collective like the model's (an NCCL kernel on a
GPU): its time is listed apart, not counted as host time. --baseline runs the same measurement on another revision of
the code (a temporary git worktree) in the same run, alternating, so old and new are compared on one machine
state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NULL_ATTENTION = "TPLA_BENCH_NULL_ATTENTION"
OVERRIDES = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_key_value_heads": 2, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
             "q_lora_rank": None, "max_position_embeddings": 40960}


def _null_attention() -> None:
    """Attention decode as a no-op (in every process: spawned TP ranks import this module again)."""
    from tpla_serve.layers.attention.torch_backend import TorchAttentionBackend

    def decode(self, q_nope, q_pe, layer, fb, scale, nope_scale=1.0):  # noqa: ANN001, ANN202
        return torch.zeros_like(q_nope)

    TorchAttentionBackend.decode = decode


if os.environ.get(NULL_ATTENTION):
    _null_attention()


class Timer:
    """Wall time spent inside a wrapped callable."""

    def __init__(self, fn):  # noqa: ANN001
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _new_request(sched, ids: list[int], params, rid: str):  # noqa: ANN001, ANN202
    from tpla_serve.engine import request

    if hasattr(request, "RequestSpec"):  # this revision's API takes a RequestSpec
        return sched.new_request(request.RequestSpec(ids, params, rid=rid))
    return sched.new_request(ids, params, rid=rid)


def _sampler_owner(sched):  # noqa: ANN001, ANN202
    return getattr(sched, "launcher", sched)


def rank1_ms(engine, reqs: list, repeats: int = 5) -> float:  # noqa: ANN001
    """What a rank > 0 does per decode step before its forward: decode rank 0's message and lay out its
    inputs. Timed here on rank 0's own structures for the same requests (the ranks hold equal state)."""
    runner = engine.runner
    if hasattr(runner, "table"):  # this revision: slots and positions, inputs gathered from the request table
        import numpy as np

        from tpla_serve.distributed.control import RunDecode, decode_op, encode_op
        from tpla_serve.forward_batch import TableDelta

        op = RunDecode(np.array([r.slot for r in reqs], dtype=np.int64),
                       np.array([r.num_computed for r in reqs], dtype=np.int64), TableDelta.empty())
        data = encode_op(op)

        def work() -> None:
            got = decode_op(data)
            runner.table.decode_batch(got.slots, got.positions, runner.kv_pool, runner.attn_backend)
    else:  # the baseline: every request's page list in the step message
        import msgpack

        from tpla_serve.engine.forward_batch import BatchEntry, ForwardMode, build_forward_batch

        msg = {"op": "step", "mode": "decode",
               "entries": [[[r.last_token], r.num_computed, list(r.pages), False] for r in reqs]}
        data = msgpack.packb(msg, use_bin_type=True)

        def work() -> None:
            got = msgpack.unpackb(data, raw=False)
            entries = [BatchEntry(ids, prefix, pages, bool(a)) for ids, prefix, pages, a in got["entries"]]
            build_forward_batch(ForwardMode(got["mode"]), entries, runner.kv_pool, runner.attn_backend,
                                runner.device)
    work()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats * 1e3


def measure(engine, context: int, batch: int, steps: int) -> dict[str, float]:  # noqa: ANN001
    from tpla_serve.sampling.params import SamplingParams

    sched = engine.scheduler
    params = SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    page = engine.runner.page_size
    reqs = []
    for i in range(batch):
        req = _new_request(sched, [1] * context, params, f"h-{context}-{i}")
        pages = sched.allocator.alloc(-(-(context + steps + 8) // page))
        assert pages is not None, "the batch does not fit the KV pool"
        sched.add_prefilled(req, pages, first_token=1)
        reqs.append(req)
    model = engine.runner.model
    owner = _sampler_owner(sched)
    runner = engine.runner
    forward, sampler = Timer(model.forward), Timer(owner.sampler)
    commit = Timer(runner.commit_tokens) if hasattr(runner, "commit_tokens") else None
    for _ in range(3):  # warm-up
        sched.step()
    model.forward, owner.sampler = forward, sampler
    if commit is not None:
        runner.commit_tokens = commit
    forward.seconds = sampler.seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        sched.step()
    wall = time.perf_counter() - start
    del model.forward
    owner.sampler = sampler.fn
    if commit is not None:
        del runner.commit_tokens
    rank1 = rank1_ms(engine, reqs) if engine.config.tp_size > 1 else 0.0
    for req in reqs:
        sched.abort(req.rid)
        sched.pop_finished(req.rid)
    return {"wall_ms": wall / steps * 1e3, "forward_ms": forward.seconds / steps * 1e3,
            "sampler_ms": sampler.seconds / steps * 1e3, "rank1_ms": rank1,
            "broadcast_ms": commit.seconds / steps * 1e3 if commit is not None and engine.config.tp_size > 1 else 0.0}


def worker(args: argparse.Namespace) -> None:
    from tpla_serve import Engine

    results = []
    for tp in args.tps:
        tokens = max(args.batches) * (max(args.contexts) + args.steps + 16)
        engine = Engine(
            model_path=str(ROOT / "models" / "mla-tiny"), load_format="dummy", skip_tokenizer_init=True,
            json_model_override_args=json.dumps(OVERRIDES), dtype="float32", device="cpu", tp_size=tp,
            tpla_groups=tp, page_size=16, kv_cache_bytes=tokens * 40 * 4 // tp + (256 << 20),
            max_running_requests=max(args.batches), context_length=max(args.contexts) + args.steps + 16,
        )
        try:
            for ctx in args.contexts:
                for batch in args.batches:
                    m = measure(engine, ctx, batch, args.steps)
                    results.append({"tp": tp, "context": ctx, "batch": batch, **m})
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            engine.shutdown()
    json.dump(results, sys.stdout)


def run_tree(tree: Path, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, NULL_ATTENTION: "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("", "router", "kernels"))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps),
           "--contexts", ",".join(map(str, args.contexts)), "--batches", ",".join(map(str, args.batches)),
           "--tps", ",".join(map(str, args.tps))]
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def host_ms(rows: list[dict]) -> dict[tuple[int, int, int], float]:
    """Rank 0's host = wall - forward - sampler; at TP > 1 the step waits for the slower of rank 0's host
    work and rank 1's (its message and inputs), so the larger counts."""
    out = {}
    for r in rows:
        rank0 = r["wall_ms"] - r["forward_ms"] - r["sampler_ms"] - r.get("broadcast_ms", 0.0)
        out[r["tp"], r["context"], r["batch"]] = max(rank0, r["rank1_ms"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a git revision to measure beside this tree")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--tps", default="1,2")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of baseline and this tree")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.tps = [int(x) for x in args.tps.split(",")]
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import write_result

    trees = {"this tree": ROOT}
    scratch = None
    if args.baseline:
        scratch = Path(tempfile.mkdtemp(prefix="bench-host-step-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(scratch), args.baseline],
                       check=True, capture_output=True)
        trees = {f"baseline {args.baseline}": scratch, "this tree": ROOT}
    measured: dict[str, list[dict[tuple[int, int, int], float]]] = {name: [] for name in trees}
    raw: dict[str, list[list[dict]]] = {name: [] for name in trees}
    try:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                rows = run_tree(tree, args)
                raw[name].append(rows)
                measured[name].append(host_ms(rows))
    finally:
        if scratch is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch)], check=False)
    keys = sorted(measured["this tree"][0])
    names = list(trees)
    lines = ["| TP | context | batch | " + " | ".join(f"host ms/step, {n}" for n in names)
             + " | wall ms/step, this tree | model forward ms | sampler ms | token broadcast ms | rank 1 ms |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|"]
    for key in keys:
        best = {n: min(m[key] for m in measured[n]) for n in names}
        last = next(r for r in raw["this tree"][-1] if (r["tp"], r["context"], r["batch"]) == key)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{best[n]:.2f}" for n in names)
                     + f" | {last['wall_ms']:.2f} | {last['forward_ms']:.2f} | {last['sampler_ms']:.2f} |"
                     f" {last['broadcast_ms']:.2f} | {last['rank1_ms']:.2f} |")
    body = "\n".join([
        "`python benchmarks/bench_host_step.py " + " ".join(sys.argv[1:]) + "`. " + __doc__.split("\n\n")[2]
        .replace("\n", " "),
        "",
        f"{args.steps} timed steps after 3 warm-up steps, {args.rounds} alternating rounds; the best round of each "
        "cell (host work is what noise only adds to).",
        "",
        *lines,
    ])
    print(write_result("host_step", "Host time per decode step (CPU)", body))
    print(body)


if __name__ == "__main__":
    main()
