"""Load-test any running loraswap with locust (https://locust.io), headless or with its web UI.

    locust -f bench/locustfile.py --host http://127.0.0.1:8000
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 2m \\
        --adapters symptoms,treatment,base --max-tokens 64

Each simulated user asks medical questions of a random adapter through /v1/answer, the OpenAI chat
route and its streaming form. Without --adapters, every model /v1/models lists is used.
A response counts as a failure unless it is a 200 with a complete answer.
"""

from __future__ import annotations

import json
import random
from typing import Any

from locust import HttpUser, between, events, task

QUESTIONS = (
    "What are the symptoms of asthma ?",
    "What are the treatments for glaucoma ?",
    "What causes gout ?",
    "How to prevent Lyme disease ?",
    "Is cystic fibrosis inherited ?",
    "How many people are affected by psoriasis ?",
)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--adapters", default="", help="Comma-separated adapter names (default: all of /v1/models).")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request.")
    parser.add_argument(
        "--api-key", default="", env_var="LORASWAP_API_KEY", help="Inference key, if the server has one."
    )


class LoraswapUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self.max_tokens = int(opts.max_tokens)
        self.adapters = [a.strip() for a in opts.adapters.split(",") if a.strip()]
        if not self.adapters:
            r = self.client.get("/v1/models", headers=self.headers, name="/v1/models")
            self.adapters = [m["id"] for m in r.json()["data"]] if r.ok else ["base"]

    def _ask(self) -> tuple[str, str]:
        return random.choice(self.adapters), random.choice(QUESTIONS)

    @task(3)
    def answer(self) -> None:
        adapter, question = self._ask()
        body = {"adapter": adapter, "question": question, "max_tokens": self.max_tokens}
        with self.client.post(
            "/v1/answer", json=body, headers=self.headers, name="/v1/answer", catch_response=True
        ) as r:
            if r.status_code != 200 or "answer" not in r.json():
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task(2)
    def chat(self) -> None:
        adapter, question = self._ask()
        body = {"model": adapter, "messages": [{"role": "user", "content": question}], "max_tokens": self.max_tokens}
        with self.client.post(
            "/v1/chat/completions", json=body, headers=self.headers, name="/v1/chat/completions", catch_response=True
        ) as r:
            if r.status_code != 200 or r.json().get("object") != "chat.completion":
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task(1)
    def chat_stream(self) -> None:
        adapter, question = self._ask()
        body = {
            "model": adapter,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self.headers,
            name="/v1/chat/completions (stream)",
            stream=True,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            data = []
            for raw in r.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                if line.startswith("data: "):
                    data.append(line[6:])
            if not data or data[-1] != "[DONE]" or any("error" in json.loads(d) for d in data[:-1]):
                r.failure(f"incomplete or failed stream: {data[-2:]}")
