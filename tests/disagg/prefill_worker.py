"""A stand-in prefill process for the KV-stream tests: a KVSender driven by JSON lines on stdin, with the
cluster secret from $TPLA_DISAGGREGATION_SECRET (none when unset), as a server reads it.

Prints {"port": bootstrap_port} first, then answers commands:
  {"cmd": "send", "room": R, "n": N, "mode": M}  M = "now" (stream at once, buffered until REGISTER),
      "wait" (wait for the REGISTER first), "gate" (layer 0, then wait for {"cmd": "go"} before the rest),
      "stall" (layers 0 and 1, then nothing)
  {"cmd": "events"}  prints {"events": [[room, message], ...]} (RoomFailed events so far)
  {"cmd": "exit"}
"""

from __future__ import annotations

import json
import os
import sys
import time

from kv_stream_helpers import prompt_kv, small_spec, wait_until

from tpla_serve.config import DISAGGREGATION_SECRET_ENV
from tpla_serve.disagg import KVSender


def _reply(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = small_spec()
    timeout_s = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    sender = KVSender(spec, timeout_s=timeout_s, secret=os.environ.get(DISAGGREGATION_SECRET_ENV))
    _reply({"port": sender.bootstrap_port})
    events: list = []
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        if cmd["cmd"] == "events":
            time.sleep(0.05)
            events += [[e.room, e.message] for e in sender.poll()]
            _reply({"events": events})
            continue
        room, n, mode = cmd["room"], cmd["n"], cmd["mode"]
        kv = prompt_kv(room, n, spec)
        if mode == "wait":
            registered = wait_until(lambda: sender.stats().rooms_registered >= 1, 20.0)
            _reply({"registered": registered})
        for layer, (ckv, kpe) in enumerate(kv):
            if mode == "stall" and layer == 2:
                _reply({"stalled": room})
                break
            sender.send_layer(room, layer, ckv, kpe)
            if mode == "gate" and layer == 0:
                _reply({"gated": room})
                assert json.loads(sys.stdin.readline())["cmd"] == "go"
        else:
            sender.send_done(room, room % 1000, -0.5)
            _reply({"sent": room})
    sender.close()


if __name__ == "__main__":
    main()
