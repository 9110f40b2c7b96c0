"""`genserve keys create | list | revoke`: API keys, straight on the store (no server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from genserve.config import Settings

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
console = Console(stderr=True)

StoreOption = Annotated[
    str | None, typer.Option("--store", help="Store URL (default: the configured store).")
]
DataDirOption = Annotated[Path | None, typer.Option(help="Data directory (default: the configured one).")]


def _keys(store: str | None, data_dir: Path | None):  # noqa: ANN202 - KeyStore, imported lazily
    from genserve.auth.keys import KeyStore

    overrides = {"store_url": store, "data_dir": data_dir}
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return KeyStore.from_url(settings.resolved_store_url)


def _max_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise typer.BadParameter(f"'{text}' is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(width), int(height)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A label for the key (who or what uses it).")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="Requests per second (server default).")
    ] = None,
    burst: Annotated[int | None, typer.Option(min=1, help="Token-bucket size (server default).")] = None,
    images_per_day: Annotated[int | None, typer.Option(min=0, help="Images per UTC day.")] = None,
    gpu_seconds_per_day: Annotated[float | None, typer.Option(min=0, help="GPU-seconds per UTC day.")] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Allowed model; repeat (default: all).")
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="Allowed LoRA; repeat (default: all).")
    ] = None,
    control: Annotated[
        list[str] | None,
        typer.Option(
            "--control", help="Allowed ControlNet / T2I-Adapter / IP-Adapter; repeat (default: all)."
        ),
    ] = None,
    max_size: Annotated[str | None, typer.Option(help="Largest WIDTHxHEIGHT the key may ask for.")] = None,
    store: StoreOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a key and print it once (stdout); only its hash is stored."""
    from genserve.auth.keys import ROLES, KeyLimits

    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}")
    max_width, max_height = _max_size(max_size)
    limits = KeyLimits(
        rate_per_second=rate,
        rate_burst=burst,
        images_per_day=images_per_day,
        gpu_seconds_per_day=gpu_seconds_per_day,
        allowed_models=model or None,
        allowed_loras=lora or None,
        allowed_controls=control or None,
        max_width=max_width,
        max_height=max_height,
    )
    key, token = _keys(store, data_dir).create(name, role, limits)  # type: ignore[arg-type]
    console.print(f"created {key.role} key {key.id} ({key.name}); it is shown only now:")
    print(token)


@keys_app.command("list")
def list_keys(
    all: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    store: StoreOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Keys with their limits and today's use (UTC)."""
    keys = _keys(store, data_dir)
    table = Table("name", "role", "created", "state", "limits", "images today", "GPU-s today")
    table.add_column("id", no_wrap=True, min_width=12)  # the handle for revoke: never cut
    for key in keys.list(include_revoked=all):
        limits = ", ".join(f"{name}={value}" for name, value in vars(key.limits).items() if value is not None)
        used = keys.usage(key.id)
        table.add_row(
            key.name,
            key.role,
            key.created_at.strftime("%Y-%m-%d %H:%M"),
            "active" if key.active else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}",
            limits or "-",
            str(used.images),
            f"{used.gpu_seconds:.1f}",
            key.id,
        )
    Console().print(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `genserve keys list`).")],
    store: StoreOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key: its next request gets 401."""
    key = _keys(store, data_dir).revoke(key_id)
    if key is None:
        console.print(f"[red]no key {key_id}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked key {key.id} ({key.name})")
