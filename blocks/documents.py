"""Loading saved block documents: absent is not the same as broken.

Every resolver in this package falls back to its built-in defaults only when no document of that
name is saved (or the block type was never registered). A document that exists but does not load
-- a field of the wrong type, a required field missing, a value outside its range -- is an error
naming the block, the document and the fix, never a silent switch to local defaults.
"""
from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from tasks.errors import ConfigurationError

B = TypeVar("B", bound=Block)


def load_saved(block_cls: type[B], name: str) -> B | None:
    """The saved document `name` of `block_cls`; None when no such document (or block type) is
    saved; ConfigurationError when it is saved but does not validate."""
    try:
        return block_cls.load(name, validate=True)
    except ValueError as exc:
        # Block.load turns the API's 404 (no document of that name, or no such block type) into
        # a ValueError raised from ObjectNotFound; anything else is a document that does not load.
        if isinstance(exc.__cause__, ObjectNotFound):
            return None
        raise ConfigurationError(invalid_document_message(block_cls, name, exc)) from exc
    except RuntimeError as exc:
        # Prefect 3 wraps a failed validation in a RuntimeError advising `validate=False`, which
        # would load a block with fields missing: name the fields instead.
        if not isinstance(exc.__cause__, ValidationError):
            raise
        raise ConfigurationError(
            invalid_document_message(block_cls, name, exc.__cause__)) from exc


def invalid_document_message(block_cls: type[Block], name: str, exc: Exception) -> str:
    slug = block_cls.get_block_type_slug()
    return (f"saved {block_cls.__name__} block document {name!r} (block type {slug!r}) is "
            f"invalid: {problems(exc)}. Fix it in the Prefect UI (Blocks) or save a valid one "
            f"with {block_cls.__name__}(...).save({name!r}, overwrite=True); to stop using it, "
            f"delete it with `prefect block delete {slug}/{name}`")


def problems(exc: Exception) -> str:
    """What is wrong, field by field; input values are left out (they may be secrets)."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    found = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "document"
        found.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(found)
