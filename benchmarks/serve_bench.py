"""Server throughput: generated tokens per second at 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve_bench.py                               # the shipped model
    python benchmarks/serve_bench.py --checkpoint benchmarks/.cache/bench-1b --slots 8

The server (grok1/server.py, `--slots` slots) runs in this process on 127.0.0.1; each client
sends `--requests` streaming completions one after the other (fixed seeds, `--max-tokens` each;
EOS may end one early). A warm-up request compiles the steps first. Tokens are counted from the
`usage` of each stream; the time to first token is the client's (median over requests). A checkpoint without a tokenizer
(bench-1b) gets 5-token prompts of token ids, and asks for logprobs so that each token streams
(its text is empty).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


async def client(url: str, model: str, index: int, requests: int, max_tokens: int, text: bool):
    tokens, first = 0, []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for r in range(requests):
            prompt = f"The function returns {index} {r}" if text else [1, 100 + index, 200 + r, 300, 400]
            body = dict(model=model, prompt=prompt, max_tokens=max_tokens,
                        seed=1000 * index + r, temperature=0.8, stream=True,
                        stream_options={"include_usage": True},
                        **({} if text else {"logprobs": 0}))   # no text without a tokenizer
            start = time.perf_counter()
            async with c.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and len(first) == r:
                        first.append(time.perf_counter() - start)
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
    return tokens, first


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, text: bool):
    start = time.perf_counter()
    results = await asyncio.gather(*(client(url, model, i, requests, max_tokens, text)
                                     for i in range(clients)))
    seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    ttft = statistics.median(f for _, firsts in results for f in firsts)
    return tokens, seconds, ttft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=os.path.join(REPO, "checkpoints", "small"))
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    import grok1
    from grok1.server import BackgroundServer

    model = grok1.load(args.checkpoint, progress=False)
    name = os.path.basename(os.path.normpath(args.checkpoint))
    with BackgroundServer(model, slots=args.slots, model_name=name) as server:
        text = model.tokenizer is not None      # else prompts of token ids
        asyncio.run(run_level(server.url, name, 1, 1, 4, text))                 # compile
        print(f"{name}, {args.slots} slots, {args.requests} requests per client, "
              f"max_tokens {args.max_tokens}")
        print("clients  tokens  seconds  tokens/s  median TTFT (s)")
        for clients in (int(c) for c in args.clients.split(",")):
            tokens, seconds, ttft = asyncio.run(run_level(server.url, name, clients, args.requests,
                                                          args.max_tokens, text))
            print(f"{clients:7d}  {tokens:6d}  {seconds:7.2f}  {tokens / seconds:8.1f}  {ttft:15.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
