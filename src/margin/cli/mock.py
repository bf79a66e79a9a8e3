"""`margin mock-upstream`: run the deterministic OpenAI-compatible mock provider."""

from __future__ import annotations

import typer


def mock_upstream_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9000, help="Port to listen on."),
    ttft_ms: float = typer.Option(
        0.0, min=0.0, help="Delay before the first byte, in ms (also applied to non-streaming answers)."
    ),
    tokens_per_s: float = typer.Option(
        0.0, min=0.0, help="Streaming pace in tokens/s (0 = no pacing); non-streaming waits tokens/rate."
    ),
    output_tokens: int = typer.Option(
        16, min=0, help="Tokens per answer, unless the request's max_tokens is smaller."
    ),
    usage: bool = typer.Option(True, "--usage/--no-usage", help="Report token usage (--no-usage: never)."),
    error_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Fraction of requests answered with HTTP 500 and an OpenAI error body."
    ),
    timeout_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of requests that hang for 1 h."),
    reset_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Fraction of streaming requests dropped (TCP reset) halfway through."
    ),
    cached_fraction: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Fraction of prompt tokens reported as cached_tokens."
    ),
    reasoning_tokens: int = typer.Option(
        0, min=0, help="Reasoning tokens reported per answer (counted in completion_tokens)."
    ),
    seed: int = typer.Option(0, help="Seed for the generated text and for the *-rate fault draws."),
    models: str = typer.Option("", help="Comma-separated model ids for /v1/models (default: a few)."),
) -> None:
    """Serve a deterministic OpenAI-compatible upstream for tests, demos and benchmarks (until Ctrl-C)."""
    # Imported here so other CLI commands do not pay for uvicorn's import.
    from margin.providers.mock_upstream import MockOptions, serve

    options = MockOptions(
        ttft_ms=ttft_ms,
        tokens_per_s=tokens_per_s,
        output_tokens=output_tokens,
        usage=usage,
        error_rate=error_rate,
        timeout_rate=timeout_rate,
        reset_rate=reset_rate,
        cached_fraction=cached_fraction,
        reasoning_tokens=reasoning_tokens,
        seed=seed,
        models=models,
    )
    typer.echo(f"mock upstream on http://{host}:{port}/v1", err=True)
    serve(host, port, options)
