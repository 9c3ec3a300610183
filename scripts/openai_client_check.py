"""The official `openai` Python client against a hivetrain server.

Usage: python openai_client_check.py BASE_URL API_KEY POOR_API_KEY

Checks, with the client's own types: the model list, a completion and a chat completion,
both again streamed (the streamed text must equal the plain one: temperature 0), the
usage counts, and the client's errors for a bad key (401) and a wallet without enough
credit (402). Prints one JSON line of what it saw; exits non-zero on any mismatch.
"""

import json
import sys

import openai


def main() -> int:
    base_url, api_key, poor_key = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    seen = {"openai": openai.__version__}

    models = [m.id for m in client.models.list()]
    assert "hivetrain" in models, models
    seen["models"] = models

    prompt = "KING HENRY:\n"
    plain = client.completions.create(model="hivetrain", prompt=prompt, max_tokens=8, temperature=0)
    text = plain.choices[0].text
    assert plain.usage.completion_tokens == 8, plain.usage
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 8, plain.usage
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="hivetrain", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == text, (streamed, text)
    seen["completion"] = text

    messages = [{"role": "user", "content": "Who goes there?"}]
    chat = client.chat.completions.create(model="hivetrain", messages=messages, max_tokens=8, temperature=0)
    reply = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model="hivetrain",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == reply, (pieces, reply)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
    seen["chat"] = reply

    try:
        openai.OpenAI(base_url=base_url, api_key="hk-wrong", max_retries=0).completions.create(
            model="hivetrain", prompt=prompt, max_tokens=2
        )
        raise AssertionError("a wrong key was served")
    except openai.AuthenticationError as e:
        seen["bad_key"] = e.status_code
    try:
        openai.OpenAI(base_url=base_url, api_key=poor_key, max_retries=0).completions.create(
            model="hivetrain", prompt=prompt, max_tokens=500
        )
        raise AssertionError("a request beyond the balance was served")
    except openai.APIStatusError as e:
        assert e.status_code == 402, e
        seen["poor"] = e.status_code

    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
