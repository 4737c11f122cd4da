"""Talks to `inferalign serve` with the official openai client, as a chat UI
would: a plain and a streamed chat, harmless and harmful, and a moderation of
both; then reads /metrics with Prometheus' parser. Prints one JSON object for
the Rust test to check."""
import json
import sys
import urllib.request

from openai import OpenAI

url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=url + "/v1", api_key=key)
harmless, harmful = sys.argv[3], sys.argv[4]


def chat(prompt):
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
    )
    completion = raw.parse()
    return {
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "completion_tokens": completion.usage.completion_tokens,
        "inferalign": completion.model_extra["inferalign"],
        "header_steered": raw.headers.get("x-inferalign-steered"),
    }


def stream(prompt):
    chunks = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stream=True
    )
    content, finish_reason, inferalign, n = "", None, None, 0
    for chunk in chunks:
        n += 1
        inferalign = inferalign or (chunk.model_extra or {}).get("inferalign")
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    return {"content": content, "finish_reason": finish_reason, "inferalign": inferalign, "chunks": n}


def moderate(inputs):
    response = client.moderations.create(model="any", input=inputs)
    return [{"flagged": r.flagged, "harmful": r.categories.model_extra["harmful"], "inferalign": r.model_extra["inferalign"]} for r in response.results]


def metrics():
    # The Prometheus text format, read with Prometheus' own Python parser.
    from prometheus_client.parser import text_string_to_metric_families
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer " + key})
    text = urllib.request.urlopen(request).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[s.name + ("{" + label + "}" if label else "")] = s.value
    return samples


report = {
    "models": [m.id for m in client.models.list()],
    "moderations": moderate([harmless, harmful]),
    "plain": {"harmless": chat(harmless), "harmful": chat(harmful)},
    "streamed": {"harmless": stream(harmless), "harmful": stream(harmful)},
}
report["metrics"] = metrics()
print(json.dumps(report))
