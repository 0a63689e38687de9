"""clembench's "use the backends directly" examples, served by clemserve.

The examples are clembench's own, with one change: ``import backends`` became
``import clemserve.client as backends`` plus ``backends.connect(address)``. They run first with models this
server can serve, then with the example's original names, showing the error each one gets where its
weights or provider are not available.

    python -m bench.demo --address HOST:PORT      (make serve, then make demo)
"""

# The examples keep clembench's `prompt, response, response_text = ...` line as it is, unused names included.
# ruff: noqa: RUF059

from __future__ import annotations

import argparse
import sys

import clemserve.client as backends

SERVABLE_MODEL = "smollm2-135m-instruct"
SERVABLE_MODELS = ["smollm2-135m-instruct", "echo"]
SEED_MODEL = "zephyr-7b-beta"
SEED_MODELS = ["zephyr-7b-alpha", "zephyr-7b-beta", "openchat-3.5-0106", "gpt-3.5-turbo-0125"]


def basic_example(model_name: str) -> None:
    model = backends.get_model_for(model_name)

    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
        {"role": "user", "content": "Tell me the name of the capital of Australia."},
    ]

    prompt, response, response_text = model.generate_response(messages)

    print(f"{model_name} reply:")
    print(response_text)


def multiple_models_example(model_names: list[str]) -> None:
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
        {"role": "user", "content": "Tell me the name of the capital of Australia."},
    ]

    for model_name in model_names:
        model = backends.get_model_for(model_name)

        prompt, response, response_text = model.generate_response(messages)

        print(f"{model_name} reply:")
        print(response_text)

        # remove Model instance to free up memory:
        del model


def explain(model_name: str, err: backends.ClemserveError) -> None:
    print(f"{model_name}: {type(err).__name__}: {err}")


def server_reachable(address: str) -> bool:
    try:
        backends.list_models(address=address, timeout=10)
    except (backends.UnavailableError, backends.DeadlineExceededError):
        return False
    return True


def heading(text: str) -> None:
    print(f"\n=== {text} ===")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=backends.default_address(), help="clemserve server (host:port)")
    args = parser.parse_args()
    if not server_reachable(args.address):
        print(f"no clemserve server at {args.address}: run `make serve` first", file=sys.stderr)
        return 1
    backends.connect(args.address)

    heading(f"Basic example with {SERVABLE_MODEL}")
    basic_example(SERVABLE_MODEL)
    heading(f"Multiple models example with {SERVABLE_MODELS}")
    multiple_models_example(SERVABLE_MODELS)

    heading(f"Basic example with the original {SEED_MODEL}")
    try:
        basic_example(SEED_MODEL)
    except backends.ClemserveError as err:
        explain(SEED_MODEL, err)
    heading("Multiple models example with the original names")
    # one name at a time, so that the first model's error does not hide the others'
    for model_name in SEED_MODELS:
        try:
            multiple_models_example([model_name])
        except backends.ClemserveError as err:
            explain(model_name, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
