"""Where the KV stream's time goes: wall and thread-CPU time per call of its pieces, in both processes.

    python benchmarks/profile_kv_stream.py cuda 1:1:256 4:2:1024 [T:g:n ...]

Runs bench_transfer.py's "ours" path (a prefill process streaming one prompt to the T decode ranks of this
process) for each decode layout T, g and prompt length n: two warm-up rooms, then five timed ones, with the
sender's and receiver's functions wrapped to add up their calls, wall time and CPU time of the calling
thread (wall beyond CPU is waiting: for bytes, a GPU copy, or the GIL). Prints, per configuration, the
median transfer time and a table per process (S.* sender side, R.* receiver side; R.payload includes the
landing it finishes, R.land_staged). With cuda it first times the device path's two pieces alone, without
the other threads: staging layers (stage_device_layers, one layer or a batch) and landing a staged chunk
(RoomPages.land_staged).
"""
import collections, sys, threading, time, multiprocessing as mp, itertools
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer as bt
import torch

ACC = collections.defaultdict(lambda: [0, 0.0, 0.0])
LOCK = threading.Lock()

def wrap(obj, name, tag):
    f = getattr(obj, name)
    def w(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            with LOCK:
                e = ACC[tag]; e[0] += 1; e[1] += dt; e[2] += dc
    setattr(obj, name, w)

def patch_prefill():
    from tpla_serve.disagg import routes, sender, sender_stream, staging, tcp_stream
    wrap(sender.KVSender, "send_layer", "S.send_layer")
    wrap(sender, "stage_device_layers", "S.stage")  # a layer of a room not registered yet
    wrap(sender_stream, "stage_device_layers", "S.stage_batch")  # a registered room's batch, IO thread
    wrap(sender.KVSender, "_on_command", "S.io_cmd")
    wrap(sender_stream.RoomStreamer, "flush", "S.flush")
    wrap(routes._Fill, "__call__", "S.fill")
    wrap(tcp_stream, "_send_all", "S.sendall")
    wrap(routes, "_message", "S.message")
    wrap(tcp_stream._Lane, "_take", "S.take")
    wrap(staging.StagingPool, "acquire", "S.acquire")

def patch_decode():
    from tpla_serve.disagg import pages, receiver, tcp_listen
    wrap(receiver.KVReceiver, "land", "R.land")
    wrap(pages.RoomPages, "land_staged", "R.land_staged")
    wrap(tcp_listen._Reader, "_payload", "R.payload")
    wrap(tcp_listen._Reader, "_fill", "R.fill_hdr")
    wrap(receiver.KVReceiver, "_on_layer", "R.on_layer")
    wrap(receiver.KVReceiver, "_on_done", "R.on_done")
    wrap(pages.KVPages, "reap", "R.reap")
    wrap(pages.RoomPages, "flush", "R.flush")
    from tpla_serve.disagg import staging
    wrap(staging.StagingPool, "acquire", "R.acquire")

def dump(title):
    print(f"--- {title}: tag count wall_ms cpu_ms us/call(wall) us/call(cpu)", flush=True)
    for tag, (c, w, cpu) in sorted(ACC.items()):
        print(f"{tag:16s} {c:6d} {w*1e3:9.2f} {cpu*1e3:9.2f} {w/c*1e6:9.1f} {cpu/c*1e6:9.1f}", flush=True)
    ACC.clear()

def child(conn, max_len, device):
    patch_prefill()
    orig_recv = conn.recv
    def recv():
        r = orig_recv()
        if r[0] == "dump":
            dump("prefill " + r[1]); return recv()
        return r
    conn.recv = recv
    bt._prefill_main(conn, max_len, device)

def micro(device):
    """Uncontended costs of the device path's pieces: stage a layer; land a staged chunk."""
    from tpla_serve.disagg.staging import StagingPool, stage_device_layers
    from tpla_serve.disagg.pages import KVPages
    from tpla_serve.cache.pool import LatentKVPool
    pool = StagingPool(pin=True)
    for n in (256, 1024, 8192):
        ckv = torch.randn(n, 512, device=device).bfloat16(); kpe = torch.randn(n, 64, device=device).bfloat16()
        for g in (1, 2):
            for rep in range(2):
                torch.cuda.synchronize(); t0 = time.perf_counter(); out = []
                for _ in range(27):
                    out.append(stage_device_layers(pool, [ckv], [kpe], g))
                t1 = time.perf_counter()
                for o in out: o[2].synchronize(); o[3].drop()
                t2 = time.perf_counter()
            print(f"micro stage n={n} g={g}: {(t1-t0)/27*1e6:.1f} us/layer to issue, {(t2-t0)*1e3:.2f} ms to all ready", flush=True)
            side = torch.cuda.Stream()
            for rep in range(2):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                events = []
                for _ in range(27):
                    e = torch.cuda.Event(); e.record(); events.append(e)
                t1 = time.perf_counter()
                o = stage_device_layers(pool, [ckv] * 27, [kpe] * 27, g, side, tuple(events))
                t2 = time.perf_counter()
                o[2].synchronize(); o[3].drop()
                t3 = time.perf_counter()
            print(f"micro stage_batch n={n} g={g}: {(t1-t0)/27*1e6:.1f} us/layer to record, {(t2-t1)*1e3:.2f} ms to "
                  f"issue 27 layers, {(t3-t0)*1e3:.2f} ms to all ready", flush=True)
        kp = KVPages(LatentKVPool(27, n // 64 + 2, 64, 256, 64, torch.bfloat16, device))
        rp = kp.room(list(range(1, n // 64 + 1)))
        for count in (1, 9):
            layers = [(i, torch.bfloat16, 256, 64) for i in range(count)]
            buf = torch.empty(count * n * 320 * 2, dtype=torch.uint8, pin_memory=True)
            for rep in range(2):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                for _ in range(27 // count):
                    rp.land_staged(layers, 0, n, buf, lambda: None)
                t1 = time.perf_counter(); rp.flush(); t2 = time.perf_counter()
            print(f"micro land_staged n={n} layers/msg={count}: {(t1-t0)/(27//count)*1e6:.1f} us/msg to issue, {(t2-t0)*1e3:.2f} ms all", flush=True)

def main():
    device = sys.argv[1]
    if device == "cuda":
        micro(device)
    cfgs = [tuple(int(x) for x in c.split(":")) for c in sys.argv[2:]]
    torch.set_num_threads(1)
    patch_decode()
    ctx = mp.get_context("spawn")
    conn, cc = ctx.Pipe()
    max_len = max(c[2] for c in cfgs)
    p = ctx.Process(target=child, args=(cc, max_len, device), daemon=True); p.start()
    port = conn.recv()
    rooms = itertools.count(1)
    for t, g, n in cfgs:
        layout = bt.DecodeLayout(kv=bt.SPEC, tp_size=t, latent_groups=g, page_size=bt.PAGE_SIZE)
        dec = bt._Decode(layout, max_len, 1, device)
        for _ in range(2):
            dec.run(conn, port, next(rooms), n)
        ACC.clear(); conn.send(("dump", "warmup"))
        times = []
        for _ in range(5):
            times.append(dec.run(conn, port, next(rooms), n))
        dec.close()
        nb = t * bt.SPEC.num_layers * n * layout.token_bytes()
        med = sorted(times)[2]
        print(f"=== T{t} g{g} n{n}: median {med[0]*1e3:.2f} ms {nb/med[0]/1e9:.2f} GB/s cpu pre {med[1]*1e3:.1f} dec {med[2]*1e3:.1f}  (5 runs, totals below)", flush=True)
        dump(f"decode T{t}g{g}n{n}")
        conn.send(("dump", f"T{t}g{g}n{n}")); time.sleep(0.3)
    conn.send(("exit",)); p.join(30)

if __name__ == "__main__":
    main()
