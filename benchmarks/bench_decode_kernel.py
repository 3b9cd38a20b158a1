"""Paged MLA/TPLA decode kernel on a GPU: bandwidth against the card's copy bandwidth, and TPLA vs MLA-TP.

Sections (each prints a markdown table; all of them go to one dated file under --results-dir):
  copy      device-to-device copy bandwidth (bytes read + written), the ceiling for a memory-bound kernel,
            and a bf16 GEMM's rate, the ceiling for a compute-bound one (roofline: the larger of the two times)
  check     the kernel against the fp32 torch reference at real shapes (poisoned outputs, fresh inputs)
  tune      (--tune) candidate tilings per decode_config table entry; the fastest correct one is used below
  grid      B x context x heads x ckv: time, GB/s, % of copy bandwidth
  paper     per-rank attention time of MLA-TP (all 512 latent dims) against TPLA (r/g dims), equal batch

Where FlashInfer imports, its MLA kernel (BatchMLAPagedAttentionWrapper, head_dim_ckv = the latent slice;
its Hopper kernel at 512, its fa2 kernel at 256, where the Hopper one faults) is timed on the same pools and
queries in the same run, in extra columns of the paper and grid tables.

Each time is the median of triton.testing.do_bench over a CUDA-graph replay of one call (the way the
engine runs decode), with the L2 cache flushed before every replay. Bytes counted: every KV token's
latent + rope row once, the queries, the outputs and the LSE.

    python benchmarks/bench_decode_kernel.py [--quick] [--tune] [--skip-grid] [--no-flashinfer] [--out-dir DIR]
                                             [--tag TAG]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from tpla_kernels.decode import launch_mla_decode, mla_decode
from tpla_kernels.decode_config import DecodeConfig, default_config, default_num_splits, shape_class
from tpla_kernels.reference import mla_decode_reference

D_PE = 64
PAGE = 64
DTYPE = torch.bfloat16
SM_SCALE = 1 / math.sqrt(192)
# FlashInfer MLA backend per head_dim_ckv: its Hopper (fa3) kernel faults at 256 (H200, 0.6.0), fa2 runs it.
FLASHINFER_BACKENDS = {512: "auto", 256: "fa2"}


def log(msg: str) -> None:
    print(msg, flush=True)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Pool:
    """One layer's paged latent cache for B requests of ctx tokens each, pages scattered at random."""

    def __init__(self, batch: int, ctx: int, ckv: int, gen: torch.Generator) -> None:
        pages_per = -(-ctx // PAGE)
        num_pages = batch * pages_per
        self.ckv = torch.randn(num_pages, PAGE, ckv, device="cuda", dtype=DTYPE, generator=gen)
        self.kpe = torch.randn(num_pages, PAGE, D_PE, device="cuda", dtype=DTYPE, generator=gen)
        perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
        self.page_table = perm.view(batch, pages_per).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.batch, self.ctx, self.ckv_dim = batch, ctx, ckv

    def queries(self, heads: int, gen: torch.Generator, q_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = heads * q_len
        q_nope = torch.randn(self.batch, rows, self.ckv_dim, device="cuda", dtype=DTYPE, generator=gen)
        q_pe = torch.randn(self.batch, rows, D_PE, device="cuda", dtype=DTYPE, generator=gen)
        return q_nope, q_pe

    def bytes_moved(self, heads: int) -> int:
        elem = torch.finfo(DTYPE).bits // 8
        kv = self.batch * self.ctx * (self.ckv_dim + D_PE) * elem
        q = self.batch * heads * (self.ckv_dim + D_PE) * elem
        out = self.batch * heads * (self.ckv_dim * elem + 4)
        return kv + q + out


def time_graph(fn: Callable[[], object]) -> float:
    """Median ms of one CUDA-graph replay of fn, L2 flushed before each replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph
    return ms


class FlashInfer:
    """FlashInfer's paged MLA decode on a Pool (one query per request), planned once per shape."""

    def __init__(self) -> None:
        import flashinfer
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        self.version = flashinfer.__version__
        self.workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        self.wrapper_cls = BatchMLAPagedAttentionWrapper
        self.compiled: dict[int, float] = {}  # head_dim_ckv -> seconds of its first plan (JIT build or load)

    def runner(self, pool: Pool, q_nope: torch.Tensor, q_pe: torch.Tensor) -> Callable[[], object]:
        batch, heads, ckv = q_nope.shape
        pages_per = pool.page_table.shape[1]
        wrapper = self.wrapper_cls(self.workspace, backend=FLASHINFER_BACKENDS[ckv])
        t0 = time.time()
        wrapper.plan(
            torch.arange(batch + 1, dtype=torch.int32),
            torch.arange(batch + 1, dtype=torch.int32) * pages_per,
            pool.page_table.reshape(-1),
            pool.seq_lens.cpu(),
            heads, ckv, D_PE, PAGE, False, SM_SCALE, DTYPE, DTYPE,
        )
        if ckv not in self.compiled:
            self.compiled[ckv] = time.time() - t0
            log(f"flashinfer head_dim_ckv={ckv}: first plan (JIT build or cache load) {self.compiled[ckv]:.1f}s")
        out = torch.empty_like(q_nope)
        return lambda: wrapper.run(q_nope, q_pe, pool.ckv, pool.kpe, out=out)

    def time(self, pool: Pool, q_nope: torch.Tensor, q_pe: torch.Tensor) -> float | str:
        """Median ms as time_graph measures ours; a failure is reported in the table, not hidden.
        Shapes the backend refuses are not run: a kernel fault would end the whole process."""
        if q_nope.shape[-1] not in FLASHINFER_BACKENDS:
            return "n/a"
        try:
            return time_graph(self.runner(pool, q_nope, q_pe))
        except Exception as exc:  # e.g. a head_dim_ckv this FlashInfer build cannot instantiate
            log(f"flashinfer {tuple(q_nope.shape)}: {exc!r}"[:400])
            return type(exc).__name__


def load_flashinfer() -> FlashInfer | None:
    try:
        return FlashInfer()
    except Exception as exc:  # not installed, or installed but broken: the tables go without it
        log(f"flashinfer not available: {exc!r}")
        return None


def fmt_us(ms: float | str) -> str:
    return f"{ms * 1e3:.1f}" if isinstance(ms, float) else ms


def ratio(a: float | str, b: float | str) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n / ms / 1e6


def gemm_rate() -> float:
    """TFLOP/s of a bf16 8192^3 matrix product: the tensor-core rate a compute-bound kernel can hope for."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = do_bench(lambda: a @ b, warmup=20, rep=200, return_mode="median")
    return 2 * n**3 / ms / 1e9


def attention_flops(batch: int, ctx: int, heads: int, ckv: int) -> int:
    """QK over ckv + d_r dims and PV over ckv dims, per head and KV token."""
    return 2 * batch * ctx * heads * (2 * ckv + D_PE)


def section_check(gen: torch.Generator) -> tuple[str, bool]:
    rows, ok = [], True
    cases = [(64, 512, 1, 1.0), (128, 256, 1, 0.8), (128, 128, 1, 1.0), (16, 512, 2, 1.0), (64, 256, 3, 1.1)]
    for heads, ckv, q_len, mu in cases:
        pool = Pool(6, 4096, ckv, gen)
        pool.seq_lens.copy_(torch.tensor([4096, 3001, 17, 1024, 2500, 4000], dtype=torch.int32))
        q_nope, q_pe = pool.queries(heads, gen, q_len)
        args = (q_nope, q_pe, pool.ckv, pool.kpe, pool.page_table, pool.seq_lens, 1 / math.sqrt(192))
        out = torch.full_like(q_nope, float("nan"))
        mla_decode(*args, q_len=q_len, nope_scale=mu, out=out)
        ref, ref_lse = mla_decode_reference(*args, q_len=q_len, nope_scale=mu)
        _, lse = mla_decode(*args, q_len=q_len, nope_scale=mu)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        lse_err = float((lse - ref_lse).abs().max())
        good = bool(torch.isfinite(out).all()) and err < 1e-2 and lse_err < 5e-3
        ok &= good
        rows.append([str(heads), str(ckv), str(q_len), str(mu), f"{err:.2e}", f"{lse_err:.2e}",
                     "ok" if good else "FAIL"])
        del pool
    return table(["heads", "ckv", "q_len", "nope_scale", "rel err out", "max abs err lse", ""], rows), ok


def run_kernel(pool: Pool, q_nope: torch.Tensor, q_pe: torch.Tensor, config: DecodeConfig | None = None,
               splits: int | None = None) -> Callable[[], object]:
    heads = q_nope.shape[1]
    cfg = config or default_config(heads, pool.ckv_dim, DTYPE)
    if splits is None:
        slots = torch.cuda.get_device_properties(0).multi_processor_count * cfg.ctas_per_sm
        splits = default_num_splits(pool.batch, triton.cdiv(heads, cfg.block_h),
                                    pool.page_table.shape[1] * PAGE, slots)
    out = torch.empty_like(q_nope)
    args = (q_nope, q_pe, pool.ckv, pool.kpe, pool.page_table, pool.seq_lens, SM_SCALE, 1, 1.0, splits, cfg,
            out)
    return lambda: (launch_mla_decode(*args), out)[1]


TUNE_BATCH, TUNE_CTX = 32, 16384


def tune_candidates(row_class: int, ckv: int) -> list[DecodeConfig]:
    """Tilings worth timing for one (query-row class, ckv) table entry; the current entry comes first."""
    c = DecodeConfig
    extra = {
        (16, 512): [c(16, 32, 4, 2, 2), c(16, 64, 4, 3, 1), c(16, 32, 4, 3, 2, True), c(16, 64, 4, 2, 1, True)],
        (16, 256): [c(16, 32, 4, 3, 2), c(16, 64, 4, 2, 2), c(16, 64, 4, 3, 2, True)],
        (16, 128): [c(16, 128, 4, 3, 2), c(16, 64, 4, 2, 2), c(16, 64, 4, 3, 2, True)],
        (32, 512): [c(32, 32, 4, 2, 1), c(32, 32, 4, 3, 1, True), c(32, 64, 4, 2, 1, True)],
        (64, 512): [c(64, 64, 8, 1, 1), c(64, 64, 8, 2, 1), c(64, 64, 8, 3, 1, True), c(64, 32, 8, 4, 1, True)],
        (64, 256): [c(64, 64, 4, 3, 1), c(64, 64, 4, 2, 1), c(64, 32, 4, 3, 2, True), c(64, 64, 4, 2, 2, True)],
        (64, 128): [c(64, 64, 8, 3, 1), c(64, 128, 4, 3, 1), c(64, 64, 4, 3, 2, True)],
        (128, 512): [c(64, 64, 8, 1, 1), c(64, 64, 8, 2, 1, True)],
        (128, 256): [c(128, 64, 8, 2, 1), c(128, 32, 8, 3, 1), c(128, 64, 8, 2, 1, True)],
        (128, 128): [c(128, 128, 8, 3, 1), c(128, 128, 8, 2, 1), c(128, 64, 8, 3, 1, True)],
    }.get((row_class, ckv))
    return [] if extra is None else [default_config(row_class, ckv, DTYPE)] + extra


def section_tune(gen: torch.Generator, copy_bw: float) -> tuple[str, dict[tuple[int, int], DecodeConfig]]:
    """Time each table entry's candidates at B=32, 16K context; keep the fastest correct one."""
    rows, chosen = [], {}
    for ckv in (512, 256, 128):
        pool = Pool(TUNE_BATCH, TUNE_CTX, ckv, gen)
        for heads in (16, 32, 64, 128):
            if not tune_candidates(heads, ckv):
                continue
            q_nope, q_pe = pool.queries(heads, gen)
            nbytes = pool.bytes_moved(heads)
            ref, _ = mla_decode_reference(q_nope, q_pe, pool.ckv, pool.kpe, pool.page_table, pool.seq_lens,
                                          SM_SCALE)
            ref = ref.double()
            best: tuple[float, DecodeConfig] | None = None
            for cfg in tune_candidates(heads, ckv):
                t0 = time.time()
                shape = f"{heads}h x{ckv}"
                try:
                    fn = run_kernel(pool, q_nope, q_pe, cfg)
                    err = float((fn().double() - ref).norm() / ref.norm())
                    ms = time_graph(fn)
                except Exception as exc:  # a tiling that does not fit (shared memory, registers) is reported
                    rows.append([shape, str(tuple(cfg)), "-", "-", "-", type(exc).__name__])
                    log(f"tune {shape} {tuple(cfg)}: {exc!r}"[:300])
                    continue
                gbs = nbytes / ms / 1e6
                rows.append([shape, str(tuple(cfg)), f"{ms * 1e3:.1f}", f"{gbs:.0f}",
                             f"{100 * gbs / copy_bw:.0f}%", f"{err:.1e}"])
                log(f"tune {shape} {tuple(cfg)}: {ms * 1e3:.1f} us {gbs:.0f} GB/s err {err:.1e} "
                    f"(wall {time.time() - t0:.1f}s)")
                if err < 1e-2 and (best is None or ms < best[0]):
                    best = (ms, cfg)
            if best is not None:
                chosen[shape_class(heads, ckv)] = best[1]
            del ref
        del pool
    picks = "\n".join(f"    {key}: {cfg}," for key, cfg in sorted(chosen.items()))
    log("chosen table:\n" + picks)
    header = ["shape (B=32, 16K)", "config (bh, bn, warps, stages, ctas/SM)", "us", "GB/s", "% copy",
              "rel err"]
    return table(header, rows) + "\n\nChosen (used below):\n\n```\n" + picks + "\n```", chosen


def pick(configs: dict[tuple[int, int], DecodeConfig], heads: int, ckv: int) -> DecodeConfig:
    return configs.get(shape_class(heads, ckv)) or default_config(heads, ckv, DTYPE)


def section_grid(gen: torch.Generator, copy_bw: float, quick: bool,
                 configs: dict[tuple[int, int], DecodeConfig], fi: FlashInfer | None = None) -> str:
    batches = [1, 32, 128] if quick else [1, 8, 32, 64, 128]
    ctxs = [1024, 32768] if quick else [1024, 4096, 16384, 32768]
    rows = []
    for ckv in (512, 256, 128):
        for ctx in ctxs:
            for batch in batches:
                pool = Pool(batch, ctx, ckv, gen)
                for heads in (16, 64, 128):
                    q_nope, q_pe = pool.queries(heads, gen)
                    cfg = pick(configs, heads, ckv)
                    ms = time_graph(run_kernel(pool, q_nope, q_pe, cfg))
                    gbs = pool.bytes_moved(heads) / ms / 1e6
                    rows.append([str(ckv), str(ctx), str(batch), str(heads), f"{ms * 1e3:.1f}", f"{gbs:.0f}",
                                 f"{100 * gbs / copy_bw:.0f}%", "/".join(map(str, cfg[:5]))])
                    if fi is not None:
                        fi_ms = fi.time(pool, q_nope, q_pe)
                        fi_bw = f"{100 * pool.bytes_moved(heads) / fi_ms / 1e6 / copy_bw:.0f}%" \
                            if isinstance(fi_ms, float) else "-"
                        rows[-1] += [fmt_us(fi_ms), fi_bw, ratio(fi_ms, ms)]
                    log("grid " + " ".join(rows[-1]))
                del pool
    header = ["ckv", "context", "B", "heads", "us", "GB/s", "% copy", "bh/bn/warps/stages/ctas"]
    if fi is not None:
        header += ["FlashInfer us", "FlashInfer % copy", "ours vs FlashInfer"]
    return table(header, rows)


def section_paper(gen: torch.Generator, copy_bw: float, gemm_tf: float, quick: bool,
                  configs: dict[tuple[int, int], DecodeConfig], fi: FlashInfer | None = None) -> str:
    """MLA-TP vs TPLA per rank: T=2 (DeepSeek-V3: 128 heads) and T=4, g=2. The roofline time of a shape is
    the larger of its bytes over the copy bandwidth and its FLOPs over the GEMM rate; "best possible"
    divides FlashInfer's MLA time by the TPLA roofline: no TPLA kernel can beat that ratio on this card."""
    settings = [("T=2", 64, 128), ("T=4", 32, 64)]  # (label, MLA heads per rank, TPLA heads per rank)
    rows = []
    for label, mla_heads, tpla_heads in settings:
        for ctx in ([4096, 32768] if quick else [4096, 8192, 16384, 32768]):
            for batch in ([32] if quick else [8, 32, 64]):
                times, fi_times, roof = {}, {}, 0.0
                for name, heads, ckv in (("mla", mla_heads, 512), ("tpla", tpla_heads, 256)):
                    pool = Pool(batch, ctx, ckv, gen)
                    q_nope, q_pe = pool.queries(heads, gen)
                    ms = time_graph(run_kernel(pool, q_nope, q_pe, pick(configs, heads, ckv)))
                    times[name] = (ms, pool.bytes_moved(heads) / ms / 1e6)
                    if name == "tpla":
                        flops = attention_flops(batch, ctx, heads, ckv)
                        roof = max(pool.bytes_moved(heads) / copy_bw / 1e6, flops / gemm_tf / 1e9)
                        tflops = flops / ms / 1e9
                    if fi is not None:
                        fi_times[name] = fi.time(pool, q_nope, q_pe)
                    del pool
                (m_ms, m_bw), (t_ms, t_bw) = times["mla"], times["tpla"]
                rows.append([label, str(ctx), str(batch), f"{m_ms * 1e3:.1f}", f"{100 * m_bw / copy_bw:.0f}%",
                             f"{t_ms * 1e3:.1f}", f"{100 * t_bw / copy_bw:.0f}%", f"{tflops:.0f}",
                             f"{100 * roof / t_ms:.0f}%", f"{m_ms / t_ms:.2f}x"])
                if fi is not None:
                    fm, ft = fi_times["mla"], fi_times["tpla"]
                    rows[-1] += [fmt_us(fm), fmt_us(ft), ratio(fm, t_ms), ratio(fm, ft), ratio(fm, roof)]
                log("paper " + " ".join(rows[-1]))
    header = ["TP", "context", "B", "MLA us (H/T heads x 512+64)", "MLA % copy",
              "TPLA us (g=2: 2H/T heads x 256+64)", "TPLA % copy", "TPLA TFLOP/s", "TPLA % roofline", "speed-up"]
    if fi is not None:
        header += ["FlashInfer MLA us", "FlashInfer TPLA us", "ours-TPLA vs FlashInfer-MLA",
                   "FlashInfer-TPLA vs FlashInfer-MLA", "best possible TPLA vs FlashInfer-MLA"]
    return table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced grid")
    parser.add_argument("--tune", action="store_true",
                        help="time candidate tilings per table entry first and use the fastest below")
    parser.add_argument("--skip-grid", action="store_true", help="skip the B x context x heads x ckv grid")
    parser.add_argument("--no-flashinfer", action="store_true", help="leave FlashInfer's kernel out")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    props = torch.cuda.get_device_properties(0)
    today = dt.date.today().isoformat()
    header = (f"# Paged MLA/TPLA decode kernel — {props.name}, {today}\n\n"
              f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}. "
              f"bf16, page size {PAGE}, d_r {D_PE}, uniform context per request, random page placement. "
              "Times: median of do_bench over CUDA-graph replays, L2 flushed before each.\n")
    fi = None if args.no_flashinfer else load_flashinfer()
    if fi is not None:
        header += (f"FlashInfer {fi.version} MLA decode (`BatchMLAPagedAttentionWrapper`; backend per head_dim_ckv: "
                   f"{FLASHINFER_BACKENDS}) on the same pools and queries, timed the same way; a cell naming an "
                   "exception is a shape it failed on.\n")
    slug = "".join(ch if ch.isalnum() else "-" for ch in props.name).strip("-").lower()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_decode_{today}_{slug}{'_' + args.tag if args.tag else ''}.md"
    parts = [header]

    def save(section: str) -> None:
        """Append a finished section and rewrite the file: a run cut short keeps what it measured."""
        parts.append(section)
        path.write_text("\n".join(parts))
        log(f"wrote {path}")

    copy_bw, gemm_tf = copy_bandwidth(), gemm_rate()
    log(f"copy bandwidth {copy_bw:.0f} GB/s, bf16 GEMM {gemm_tf:.0f} TFLOP/s")
    save("## Ceilings\n\nDevice-to-device copy of 1 GiB (read + write): "
         f"**{copy_bw:.0f} GB/s**. bf16 GEMM 8192^3: **{gemm_tf:.0f} TFLOP/s**.\n")
    check, ok = section_check(gen)
    log(check)
    save("## Correctness at real shapes (vs fp32 torch reference)\n\n" + check + "\n")
    configs: dict[tuple[int, int], DecodeConfig] = {}
    if args.tune:
        tuned, configs = section_tune(gen, copy_bw)
        save("## Tiling candidates (B=32, 16K context)\n\n" + tuned + "\n")
    paper = section_paper(gen, copy_bw, gemm_tf, args.quick, configs, fi)
    log(paper)
    save("## MLA-TP vs TPLA per rank (equal batch)\n\n" + paper + "\n")
    if not args.skip_grid:
        grid = section_grid(gen, copy_bw, args.quick, configs, fi)
        save("## Kernel bandwidth grid (default tiling)\n\n" + grid + "\n")
    if fi is not None and fi.compiled:
        save("FlashInfer first plan per head_dim_ckv (JIT build or cache load): "
             + ", ".join(f"{k}: {v:.1f} s" for k, v in sorted(fi.compiled.items())) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
