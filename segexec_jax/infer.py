"""Generate from a checkpoint: `python infer.py --checkpoint DIR --prompt TEXT`.

Tokens stream to the terminal as they come (one prompt), or a JSON object with the tokens,
text, per-token log-probabilities and timings is printed (`--json`). The attention mode
defaults to the checkpoint's; `--mode` runs the same weights in another one. `--chat` wraps
each prompt in the tokenizer's chat template (one user turn, then the assistant's prompt).
`mesh.tensor=N` runs a model larger than one device over N devices, split by heads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from .checkpoint import CheckpointError, load_checkpoint, read_config, read_meta
from .config import ConfigError, config_from_dict
from .generate import generate
from .sharding import make_mesh
from .tokenization import TokenizerError, apply_chat_template, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--prompt-file", help="a file whose whole content is the prompt")
    parser.add_argument("--chat", action="store_true",
                        help="apply the checkpoint's chat template to each prompt (a user turn)")
    parser.add_argument("--system", default=None, help="with --chat: a system turn before the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--mode", choices=["segmented", "full", "streaming"], default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. inference.max_len=131072")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"attention.mode={args.mode}"] if args.mode else [])
        cfg = read_config(args.checkpoint)
        cfg = config_from_dict(cfg.to_dict(), overrides) if overrides else cfg
        # mesh.tensor=N splits the model over heads on N devices (read straight into its shards)
        mesh = make_mesh(cfg) if cfg.mesh.tensor > 1 or cfg.mesh.fsdp > 1 else None
        _, params = load_checkpoint(args.checkpoint, mesh)
        tokenizer = load_tokenizer(read_meta(args.checkpoint).get("tokenizer", "bytes"),
                                   search=Path(args.checkpoint))
        if args.prompt_file:
            try:
                prompts = [Path(args.prompt_file).read_text()]
            except OSError as e:
                raise ValueError(f"cannot read --prompt-file: {e}") from None
        else:
            prompts = args.prompt
        if any(not p for p in prompts):
            raise ValueError("the prompt is empty")
        if args.chat:
            prompts = [apply_chat_template(tokenizer, p, args.system) for p in prompts]
        elif args.system:
            raise ValueError("--system needs --chat")
        stream = not args.json and len(prompts) == 1
        printed = {"text": ""}
        generated: list[int] = []

        def on_token(row: int, token: int) -> None:
            generated.append(token)
            text = tokenizer.decode(generated)
            sys.stdout.write(text[len(printed["text"]):])
            sys.stdout.flush()
            printed["text"] = text

        stop_tokens = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        result = generate(params, cfg, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop_tokens,
                          stop_strings=args.stop, tokenizer=tokenizer, on_token=on_token if stream else None,
                          mesh=mesh)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        out = {
            "mode": cfg.attention.mode,
            "results": [
                {"prompt": p, "tokens": result.tokens[b, : result.num_generated[b]].tolist(),
                 "text": result.text[b], "logprobs": [float(x) for x in result.logprobs[b, : result.num_generated[b]]],
                 "finish_reason": result.finish_reasons[b]}
                for b, p in enumerate(prompts)],
            "timings": result.timings,
            "device": str(jax.devices()[0].device_kind),
        }
        print(json.dumps(out))
    elif stream:
        print()
    else:
        for b, text in enumerate(result.text):
            print(f"--- {b}\n{prompts[b]}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
