"""Generate from a checkpoint: `python infer.py --checkpoint DIR --prompt TEXT`.

Tokens stream to the terminal as they come (one prompt), or a JSON object with the tokens,
text, per-token log-probabilities and timings is printed (`--json`); the timings keep
compilation apart (`compile_s`), `prefill_s`, `decode_s` and `decode_tokens_per_s` exclude it.
`--prompts-file FILE` generates one prompt per line (in batches of `--batch-size`) and prints
one line per prompt: its generation (newlines as \\n), or with `--json` one JSON record.
The attention mode defaults to the checkpoint's; `--mode` runs the same weights in another
one. `--chat` wraps each prompt in the tokenizer's chat template (one user turn, then the
assistant's prompt).
`mesh.tensor=N` runs a model larger than one device over N devices, split by heads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from ..cli import ArgumentParser
from ..config import ConfigError, config_from_dict
from ..data.tokenization import TokenizerError, apply_chat_template, load_tokenizer
from ..model.sharding import make_mesh
from ..training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    read_meta,
)
from .generate import generate


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line (a final newline ends the last); a blank line is an error, so that
    output line i is always the answer to input line i."""
    try:
        lines = Path(path).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompts-file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if lines[-1] == "":
        lines.pop()
    prompts = [line.removesuffix("\r") for line in lines]
    blank = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise ValueError(f"--prompts-file {path!r}: line {blank[0]} is blank (one prompt per line; remove blank lines)")
    if not prompts:
        raise ValueError(f"--prompts-file {path!r} holds no prompts")
    return prompts


def one_line(text: str) -> str:
    """A generation on one output line: backslashes, newlines and carriage returns escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python infer.py", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--prompt-file", help="a file whose whole content is one prompt")
    source.add_argument("--prompts-file", help="a file of prompts, one per line (blank lines are an error); "
                                               "prints one result per line")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="with --prompts-file: prompts generated together (default: all of them)")
    parser.add_argument("--chat", action="store_true",
                        help="apply the checkpoint's chat template to each prompt (a user turn)")
    parser.add_argument("--system", default=None, help="with --chat: a system turn before the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt, at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--mode", choices=["segmented", "full", "streaming"], default=None,
                        help="attention mode (default: the checkpoint's)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of streaming text (--prompts-file: one per prompt)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. inference.max_len=131072")
    args = parser.parse_args(argv)
    if args.batch_size is not None and (not args.prompts_file or args.batch_size < 1):
        parser.error("--batch-size needs --prompts-file and a value of at least 1")
    try:
        if args.prompt_file:
            try:
                prompts = [Path(args.prompt_file).read_text()]
            except OSError as e:
                raise ValueError(f"cannot read --prompt-file: {e}") from None
        elif args.prompts_file:
            prompts = read_prompts_file(args.prompts_file)
        else:
            prompts = args.prompt
        if any(not p for p in prompts):
            raise ValueError("the prompt is empty")
        overrides = list(args.overrides) + ([f"attention.mode={args.mode}"] if args.mode else [])
        cfg = read_config(args.checkpoint)
        cfg = config_from_dict(cfg.to_dict(), overrides) if overrides else cfg
        # mesh.tensor=N splits the model over heads on N devices (read straight into its shards)
        mesh = make_mesh(cfg) if cfg.mesh.tensor > 1 or cfg.mesh.fsdp > 1 else None
        _, params = load_checkpoint(args.checkpoint, mesh)
        tokenizer = load_tokenizer(read_meta(args.checkpoint).get("tokenizer", "bytes"),
                                   search=Path(args.checkpoint))
        if args.chat:
            prompts = [apply_chat_template(tokenizer, p, args.system) for p in prompts]
        elif args.system:
            raise ValueError("--system needs --chat")
        stream = not args.json and len(prompts) == 1 and not args.prompts_file
        printed = {"text": ""}
        generated: list[int] = []

        def on_token(row: int, token: int) -> None:
            generated.append(token)
            text = tokenizer.decode(generated)
            sys.stdout.write(text[len(printed["text"]):])
            sys.stdout.flush()
            printed["text"] = text

        stop_tokens = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        size = args.batch_size or len(prompts)
        results = []
        for start in range(0, len(prompts), size):
            results.append(generate(params, cfg, prompts[start:start + size], max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, stop_tokens=stop_tokens, stop_strings=args.stop,
                                    tokenizer=tokenizer, on_token=on_token if stream else None, mesh=mesh))
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.prompts_file:
        line = 0
        for batch, result in enumerate(results):
            for b in range(len(result.prompts)):
                line += 1
                if not args.json:
                    print(one_line(result.text[b]))
                    continue
                print(json.dumps({"line": line, "prompt": prompts[line - 1], **_generation(result, b),
                                  "mode": cfg.attention.mode, "batch": batch, "timings": result.timings}))
        return 0
    result = results[0]
    if args.json:
        out = {
            "mode": cfg.attention.mode,
            "results": [{"prompt": p, **_generation(result, b)} for b, p in enumerate(prompts)],
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


def _generation(result, b: int) -> dict:
    n = result.num_generated[b]
    return {"tokens": result.tokens[b, :n].tolist(), "text": result.text[b],
            "logprobs": [float(x) for x in result.logprobs[b, :n]], "finish_reason": result.finish_reasons[b]}


if __name__ == "__main__":
    sys.exit(main())
