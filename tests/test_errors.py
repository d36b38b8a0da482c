"""One error tree: library code raises ``SemlaError`` subclasses, and the edges map them once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from semla.registry.asgi import HTTP_STATUS, status_for
from semla.registry.cli_common import EXIT_FAILED, EXIT_USAGE, exit_code
from semla.schemas import errors
from semla.schemas.errors import (
    IndexExpiredError,
    InvalidInputError,
    RequestTooLarge,
    SchemaError,
    SemlaError,
    ServiceBusyError,
    StorageError,
    UnprocessableError,
)

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("schemas", "registry", "client", "server")
BARE = {"ValueError", "RuntimeError", "Exception", "KeyError", "TypeError"}
#: pydantic turns a ValueError raised in a validator into its ValidationError: that is the idiom there.
VALIDATORS = {"field_validator", "model_validator", "validator"}


def _decorator_names(node: ast.AST) -> set[str]:
    names = set()
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def bare_raises(source: str, filename: str) -> list[str]:
    """``file:line`` of each ``raise`` of a built-in exception outside a pydantic validator."""
    found = []

    def visit(node: ast.AST, in_validator: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_validator = in_validator or bool(_decorator_names(node) & VALIDATORS)
        if isinstance(node, ast.Raise) and node.exc is not None and not in_validator:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BARE:
                found.append(f"{filename}:{node.lineno} raise {exc.id}")
        for child in ast.iter_child_nodes(node):
            visit(child, in_validator)

    visit(ast.parse(source), False)
    return found


def test_the_check_finds_a_bare_raise_and_spares_validators():
    source = (
        "from pydantic import field_validator\n"
        "def f():\n    raise ValueError('x')\n"
        "class M:\n    @field_validator('a')\n    def v(cls, a):\n        raise ValueError('fine here')\n"
        "def g():\n    raise InvalidInputError('fine')\n"
    )
    assert bare_raises(source, "m.py") == ["m.py:3 raise ValueError"]


def test_library_code_raises_only_the_tree():
    found = []
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += bare_raises(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "raise a SemlaError subclass from semla.schemas.errors instead:\n" + "\n".join(found)


def test_every_error_class_has_a_status_and_a_stable_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SemlaError)]
    assert len(classes) >= 25
    for cls in classes:
        assert 400 <= status_for(cls("x")) < 600, cls
        assert cls.code and cls.code.replace("_", "").isalnum(), cls
    assert len({c.code for c in classes}) == len(classes), "two classes share a code"
    assert set(HTTP_STATUS) <= set(classes)


@pytest.mark.parametrize("exc, status", [
    (InvalidInputError("x"), 400), (UnprocessableError("x"), 422), (RequestTooLarge("x"), 413),
    (ServiceBusyError("x"), 503), (IndexExpiredError("x"), 503), (StorageError("x"), 500), (SchemaError("x"), 500),
])
def test_the_status_map_takes_the_most_specific_class(exc, status):
    assert status_for(exc) == status


def test_invalid_input_is_also_a_value_error_and_a_usage_exit():
    assert isinstance(InvalidInputError("x"), ValueError)
    assert exit_code(InvalidInputError("x")) == EXIT_USAGE
    assert exit_code(StorageError("x")) == EXIT_FAILED
