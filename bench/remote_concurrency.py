"""Remote calls are not serialized: 64 concurrent Generate calls against a provider that answers after
200 ms take about as long as one.

A stand-in OpenAI API on loopback answers every chat completion after a fixed delay; clemserve forwards
to it through its ``openai`` backend. The baseline is one call's latency, measured in the same run.

    python -m bench.remote_concurrency [--calls 64] [--delay-ms 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.plots import write_table
from tests.serving import start_server
from tests.standin import Reply, StandIn

TARGET_RATIO = 2.0


def completion(_: object) -> Reply:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "gpt-bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    return Reply(200, body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    args = parser.parse_args()
    delay = args.delay_ms / 1000

    import clemserve.client as backends

    with StandIn() as standin, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        standin.script("POST", r"/chat/completions$", lambda r: Reply(200, completion(r).body, delay_s=delay))
        (folder / "registry.json").write_text(
            json.dumps([{"model_name": "gpt-bench", "backend": "openai", "model_id": "gpt-bench", "model_config": {}}])
        )
        (folder / "key.json").write_text(json.dumps({"openai": {"api_key": "sk-bench-0000", "base_url": standin.url}}))
        server = start_server(
            folder, "--registry", str(folder / "registry.json"), "--key-file", str(folder / "key.json")
        )
        try:
            model = backends.get_model_for("gpt-bench", address=server.address)
            model.generate_response([{"role": "user", "content": "warm up"}])
            singles = []
            for _ in range(5):
                started = time.perf_counter()
                model.generate_response([{"role": "user", "content": "one"}])
                singles.append(time.perf_counter() - started)
            single = statistics.median(singles)
            standin.reset()
            messages = [{"role": "user", "content": "many"}]
            with ThreadPoolExecutor(max_workers=args.calls) as pool:
                started = time.perf_counter()
                results = list(pool.map(lambda _: model.generate_response(messages), range(args.calls)))
                wall = time.perf_counter() - started
            assert len(results) == args.calls and all(r[2] == "ok" for r in results)
            peak = standin.max_in_flight
        finally:
            code = server.stop()
    ratio = wall / single
    lines = [
        "| what | value |",
        "|---|---:|",
        f"| provider delay | {delay * 1000:.0f} ms |",
        f"| one call (median of 5) | {single * 1000:.0f} ms |",
        f"| {args.calls} concurrent calls, wall time | {wall * 1000:.0f} ms |",
        f"| wall / one call | {ratio:.2f}x |",
        f"| most requests the provider held at once | {peak} |",
    ]
    print("\n".join(lines))
    verdict = "holds" if ratio < TARGET_RATIO else "MISSED"
    print(f"target: {args.calls} concurrent calls within {TARGET_RATIO}x of one call: {verdict}")
    print(f"clemserve exit code on SIGTERM: {code}")
    write_table("remote_concurrency.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
