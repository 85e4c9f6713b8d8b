"""The `openai` Python package against `hat serve device` (driven by cli/tests/openai_endpoint.rs).

Phase `serve` (cloud up): streaming chunk order, text equal to `hat generate --mode local`, usage,
400 for bad requests, 401 for a wrong key, 8 concurrent streams, a client that disconnects.
Phase `cloud-down` (cloud killed): /health says 503 and a streaming request gets an error event.
Every call has a timeout; the script exits non-zero on the first failed check.
"""

import argparse
import json
import re
import threading
import time
import urllib.error
import urllib.request

import openai

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
parser.add_argument("--key", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--refs", help="JSON: chat and plain references from hat generate --mode local")
parser.add_argument("--cloud-metrics", help="http://ADDR/metrics of hat serve cloud")
parser.add_argument("--phase", choices=["serve", "cloud-down"], default="serve")
parser.add_argument("--warm", type=int, default=2, help="the device server's --warm-sessions")
args = parser.parse_args()

root = args.base_url.rsplit("/v1", 1)[0]
client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def metric(url, name):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def http_get(path):
    try:
        with urllib.request.urlopen(root + path, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def stream_chat(prompt, max_tokens, include_usage=True):
    """The chunks of one streamed greedy chat reply."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens, stream=True, **extra
    )
    return list(stream)


def text_of(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


if args.phase == "cloud-down":
    status, body = http_get("/health")
    check(status == 503 and body["status"] == "error", f"/health is 503 while the cloud is down ({body})")
    t0 = time.time()
    try:
        stream_chat("Hello?", 8)
        raise SystemExit("FAILED: a stream without a cloud ended normally")
    except openai.APIError as e:
        check("cloud" in str(e), f"a stream without a cloud ends with an error event, not a hang ({time.time() - t0:.1f} s): {e}")
    raise SystemExit(0)

refs = json.load(open(args.refs))
chat_refs, plain = refs["chat"], refs["plain"]
max_tokens = refs["max_tokens"]

status, body = http_get("/health")
check(status == 200 and body == {"status": "ok"}, "/health is 200 {status: ok}")
models = client.models.list()
check([m.id for m in models.data] == [args.model], f"/v1/models lists the package's model {args.model}")

# One streamed chat reply: chunk order, one id, text and usage.
ref = chat_refs[0]
chunks = stream_chat(ref["prompt"], max_tokens)
check(len({c.id for c in chunks}) == 1, "every chunk of a reply has the same id")
check(chunks[0].choices[0].delta.role == "assistant", "the first chunk carries role: assistant")
with_choices = [c for c in chunks if c.choices]
finish = [c.choices[0].finish_reason for c in with_choices]
check(finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1]), f"only the last choice chunk has a finish_reason ({finish[-1]})")
check(finish[-1] == ("stop" if ref["stopped_by_eos"] else "length"), "finish_reason matches how the local run ended")
check(text_of(chunks) == ref["text"], f"streamed text equals hat generate --mode local: {ref['text']!r}")
last = chunks[-1]
check(last.choices == [] and last.usage is not None, "the usage chunk comes last, with empty choices")
check(
    (last.usage.prompt_tokens, last.usage.completion_tokens) == (ref["prompt_tokens"], len(ref["tokens"])),
    f"usage counts equal the local run ({last.usage.prompt_tokens} + {last.usage.completion_tokens})",
)
timings = with_choices[-1].model_extra.get("timings")
check(timings and timings["mode"] == "hat" and timings["accept_len"] >= 1.0, f"the last chunk carries hat's timings ({timings})")

# The raw stream ends with data: [DONE].
raw = urllib.request.Request(
    args.base_url + "/chat/completions",
    data=json.dumps(
        {"model": args.model, "messages": [{"role": "user", "content": ref["prompt"]}], "temperature": 0, "max_tokens": 4, "stream": True}
    ).encode(),
    headers={"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"},
)
with urllib.request.urlopen(raw, timeout=120) as r:
    lines = [line.decode().strip() for line in r if line.startswith(b"data: ")]
check(lines[-1] == "data: [DONE]", "the raw stream ends with data: [DONE]")

# Not streamed.
reply = client.chat.completions.create(
    model=args.model, messages=[{"role": "user", "content": ref["prompt"]}], temperature=0, max_completion_tokens=max_tokens
)
check(reply.choices[0].message.content == ref["text"], "a non-streamed reply has the same text")
check(reply.usage.completion_tokens == len(ref["tokens"]), "and the same usage")

# Plain completions, and a stop string.
comp = client.completions.create(model=args.model, prompt=plain["prompt"], temperature=0, max_tokens=max_tokens)
check(comp.choices[0].text == plain["text"], f"/v1/completions equals hat generate without --chat: {plain['text']!r}")
words = ref["text"].split(" ")
if len(words) > 2:
    stop = " " + words[2]
    cut = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": ref["prompt"]}], temperature=0, max_tokens=max_tokens, stop=[stop]
    )
    expect = ref["text"][: ref["text"].index(stop)]
    check(
        cut.choices[0].message.content == expect and cut.choices[0].finish_reason == "stop",
        f"stop={stop!r} ends the text before it ({expect!r})",
    )

# Bad requests get OpenAI-shaped 400s; a wrong key gets 401.
for bad, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"extra_body": {"mirostat": 2}}, "mirostat")]:
    try:
        client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hi"}], **bad)
        raise SystemExit(f"FAILED: {bad} was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body["param"] == param and e.body["message"], f"400 for {bad}: {e.body['message']}")
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    raise SystemExit("FAILED: an unknown model was accepted")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found", "404 model_not_found for a model this server does not serve")
wrong = openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0, timeout=30)
try:
    wrong.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hi"}])
    raise SystemExit("FAILED: a wrong key was accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401 and e.body["code"] == "invalid_api_key", "401 invalid_api_key for a wrong key")

# 8 clients at once each get their solo reply.
results = {}


def worker(i):
    try:
        results[i] = text_of(stream_chat(chat_refs[i]["prompt"], max_tokens, include_usage=False))
    except Exception as e:  # noqa: BLE001 - reported below
        results[i] = f"error: {e}"


sessions_before = metric(args.cloud_metrics, "hat:cloud_sessions_total")
threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(chat_refs))]
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=300)
check(not any(t.is_alive() for t in threads), f"{len(threads)} concurrent streams finished ({time.time() - t0:.1f} s)")
for i, r in enumerate(chat_refs):
    check(results.get(i) == r["text"], f"concurrent client {i} got its solo reply")
opened = metric(args.cloud_metrics, "hat:cloud_sessions_total") - sessions_before
check(opened >= len(threads), f"each request had its own cloud session ({opened:.0f} opened, warm replacements included)")

# A client that disconnects mid-stream frees its cloud session.


def sessions_open_becomes(n, within=20):
    t0 = time.time()
    while metric(args.cloud_metrics, "hat:cloud_sessions_open") != n and time.time() - t0 < within:
        time.sleep(0.02)
    return metric(args.cloud_metrics, "hat:cloud_sessions_open") == n, time.time() - t0


ok, _ = sessions_open_becomes(args.warm)
check(ok, f"only the {args.warm} warm cloud sessions are open before the disconnect test")
gen_before = metric(root + "/metrics", "hat:generation_tokens_total")
stream = client.chat.completions.create(
    model=args.model,
    messages=[{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
    temperature=0,
    max_tokens=400,
    stream=True,
)
got = 0
for c in stream:
    if c.choices and c.choices[0].delta.content:
        got += 1
    if got == 3:
        break
ok, _ = sessions_open_becomes(args.warm + 1)
check(ok, "the streaming request holds one cloud session besides the warm ones")
stream.close()
ok, freed = sessions_open_becomes(args.warm)
check(ok, f"closing the stream freed the cloud session in {freed:.2f} s")
deadline = time.time() + 10
while metric(root + "/metrics", "hat:client_disconnects_total") != 1 and time.time() < deadline:
    time.sleep(0.05)
check(metric(root + "/metrics", "hat:client_disconnects_total") == 1, "the device counted one client disconnect")
generated = metric(root + "/metrics", "hat:generation_tokens_total") - gen_before
check(generated < 400, f"generation stopped early: {generated:.0f} of 400 tokens")
print("all checks passed")
