"""Single-stream decode speed with speculative decoding against without, side by side on one server.

    .venv/bin/python -m benchmarks.speculative [--rounds 3] [--max-tokens 160] [--threads 2] [--model PATH]
                                               [--draft-model PATH]

Tasks grounded in their input (rewrite or extract from a given text, edit a given code block), where prompt
lookup finds the answer's words in the prompt, and free-form ones, where it cannot. Each request runs with
``speculative`` false and true, alternating, greedy, on the same server; the table gives the median decode
tok/s of each, their ratio, the share of drafted tokens accepted, and whether both gave the same text.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import httpx

from benchmarks.common import free_port, our_server_cmd, running

PASSAGE = (
    "The city council met on Tuesday evening to review the budget for the new public library on Harbour Street. "
    "The building will open in March 2027 with 40,000 books, a reading room for 120 people, a children's corner "
    "and a maker space with two 3D printers. The council approved 4.2 million euros for construction and 310,000 "
    "euros a year for staff. Councillor Maria Jensen said the library would be open seven days a week, from 8 am "
    "to 10 pm, and that membership would be free for everyone who lives in the city."
)
CODE = '''def load_orders(path):
    orders = []
    with open(path) as f:
        for line in f:
            customer, amount, date = line.strip().split(",")
            orders.append({"customer": customer, "amount": float(amount), "date": date})
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        totals[order["customer"]] = totals.get(order["customer"], 0) + order["amount"]
    return totals
'''
TASKS = {
    "rewrite": f"{PASSAGE}\n\nRewrite the text above word for word, but say 'museum' instead of 'library'.",
    "extract": f"{PASSAGE}\n\nCopy, word for word, every sentence of the text above that contains a number.",
    "code edit": f"```python\n{CODE}```\n\nRewrite this code with type hints on every function. Keep everything "
                 "else the same.",
    "free-form story": "Write a short story about a fox who learns to fly.",
    "free-form explain": "Explain in a few paragraphs why the sky is blue.",
}
GROUNDED = ("rewrite", "extract", "code edit")


def chat_prompt(user: str) -> str:
    # SmolLM2's ChatML, written out: the server parses it with --allow-special-tokens.
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="GGUF to serve (default: the embedded model)")
    parser.add_argument("--draft-model", default=None, help="draft GGUF: compare draft-model speculation instead")
    args = parser.parse_args()
    port = free_port()
    extra = ["--n-threads", str(args.threads), "--parallel", "1", "--allow-special-tokens"]
    if args.model:
        extra += ["--model-path", args.model]
    if args.draft_model:
        extra += ["--draft-model-path", args.draft_model]
    url = f"http://127.0.0.1:{port}"
    rows = []
    with running(our_server_cmd(port, *extra), url + "/ready"), httpx.Client(base_url=url, timeout=600) as client:
        def run(prompt: str, speculative: bool) -> dict:  # type: ignore[type-arg]
            body = {"prompt": prompt, "max_length": args.max_tokens, "temperature": 0, "speculative": speculative,
                    "cache_prompt": False}
            return client.post("/generate", json=body).raise_for_status().json()

        run(chat_prompt("Hello"), False)  # warm-up
        for name, task in TASKS.items():
            prompt = chat_prompt(task)
            off, on, accepted, drafted, same, tokens = [], [], 0, 0, True, 0
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                results = {spec: run(prompt, spec) for spec in order}
                off.append(results[False]["timings"]["decode_tokens_per_second"])
                on.append(results[True]["timings"]["decode_tokens_per_second"])
                drafted += results[True]["timings"]["draft_tokens"]
                accepted += results[True]["timings"]["draft_accepted"]
                same &= results[True]["text"] == results[False]["text"]
                tokens = results[False]["usage"]["completion_tokens"]
            a, b = statistics.median(off), statistics.median(on)
            rows.append((name, tokens, a, b, b / a, accepted / drafted if drafted else 0.0, same))
            print(f"{name}: {a:.1f} -> {b:.1f} tok/s", file=sys.stderr)
    kind = "draft model" if args.draft_model else "n-gram (prompt lookup)"
    print(f"\nSpeculation: {kind}, {args.threads} threads, greedy, {args.max_tokens} tokens at most, "
          f"median of {args.rounds} alternating rounds\n")
    print("| task | tokens | off tok/s | on tok/s | on / off | drafts accepted | same text |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, tokens, a, b, ratio, acc, same in rows:
        print(f"| {name} | {tokens} | {a:.1f} | {b:.1f} | {ratio:.2f}x | {acc:.0%} | {'yes' if same else 'NO'} |")
    grounded = [r[4] for r in rows if r[0] in GROUNDED]
    free = [r[4] for r in rows if r[0] not in GROUNDED]
    print(f"\ngrounded tasks: {min(grounded):.2f}x-{max(grounded):.2f}x; free-form: {min(free):.2f}x-{max(free):.2f}x")


if __name__ == "__main__":
    main()
