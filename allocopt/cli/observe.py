"""``allocopt observe``: one calibration pass -> routing statistics file."""
from __future__ import annotations

import time
from pathlib import Path

import click

from allocopt import defaults
from allocopt.cli.options import load_options, loading_options
from allocopt.config import default_data


@click.command("observe")
@click.option("--model", "model_spec", default=defaults.MODEL, show_default=True, help="Checkpoint directory or `testbed`.")
@click.option("--data", default=None,
              help="Calibration data spec: testbed:NAME, a .txt/.jsonl file or a dataset directory [default: a shipped "
                   f"testbed's own mix (deep:mix for testbed-deep), else {defaults.CALIBRATION_DATA}].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics file to write (.safetensors).")
@click.option("--seq-len", default=defaults.CALIBRATION_SEQ_LEN, show_default=True, type=click.IntRange(min=2),
              help="Tokens per row.")
@click.option("--num-seqs", default=defaults.CALIBRATION_SEQS, show_default=True, type=click.IntRange(min=1),
              help="Rows of calibration data.")
@click.option("--batch-size", default=defaults.CALIBRATION_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Rows per forward pass.")
@click.option("--similarity-tokens", default=defaults.SIMILARITY_TOKENS, show_default=True, type=click.IntRange(min=0),
              help="Real tokens per batch on which every expert runs once (expert similarity); 0 turns it off.")
@click.option("--allow-long-context", is_flag=True, help="Allow --seq-len beyond the model's context (max_position_embeddings).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@loading_options
def observe(model_spec: str, data: str | None, out: str, seq_len: int, num_seqs: int, batch_size: int, similarity_tokens: int,
            allow_long_context: bool, progress: bool, **loading) -> None:
    """Collect per-expert routing statistics (counts, gate and output-norm sums, expert similarity)."""
    from allocopt.calibration import observe as run_observer
    from allocopt.runtime.context import check_context
    from allocopt.data import load_tokens
    from allocopt.errors import AllocoptError
    from allocopt.io import output_dir
    from allocopt.runtime import load_model

    options = load_options(loading)
    data = data or default_data(model_spec, defaults.CALIBRATION_DATA)
    check_context(model_spec, seq_len, allow=allow_long_context, trust_remote_code=options.trust_remote_code)
    with output_dir(Path(out).parent):             # fail before the pass, not after it; a failed pass leaves no new folder
        model, tokenizer = load_model(model_spec, options)
        if tokenizer is None:
            raise AllocoptError(f"model {model_spec} has no tokenizer files; save the tokenizer next to the checkpoint")
        tokens = load_tokens(data, tokenizer, seq_len, num_seqs, split="calibration")
        start = time.perf_counter()
        stats = run_observer(model, tokens, batch_size=batch_size, progress=progress, similarity_tokens=similarity_tokens)
        seconds = time.perf_counter() - start
        path = stats.save(out)
    click.echo(f"observed {stats.num_tokens} tokens in {len(tokens)} rows over {len(stats.layers)} MoE layers "
               f"{stats.layers} in {seconds:.1f} s ({stats.num_tokens / max(seconds, 1e-9):.0f} tokens/s)")
    click.echo(f"wrote {path}")
