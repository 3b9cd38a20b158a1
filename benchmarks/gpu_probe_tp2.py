"""Two ranks, the bundled MoE model, CUDA graphs on: does a short greedy run finish? Dumps every thread's
stack if it does not within 60 s (a diagnosis aid for the GPU machine)."""

import faulthandler
import sys

from tpla_serve import Engine


def main() -> None:
    faulthandler.dump_traceback_later(60, exit=True, file=sys.stderr)
    with Engine(tp_size=2, device="cuda", dtype="float32") as engine:
        out = engine.generate(["def f(x):", "import os"], {"max_new_tokens": 8, "temperature": 0})
        print("tp2 graphs ok:", [o["output_ids"] for o in out], "replays", engine.runner.cuda_graph.num_replays)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
